"""The memory-bandwidth bound on token generation: how fast TG could be on these GPUs.

Generating a token streams every weight the token passes through from GPU memory once, and at
batch size 1 that read, not arithmetic, sets the pace. So the ceiling is

    ceiling [t/s] = 1 / sum over GPUs g of (bytes_per_token * share_g / bandwidth_g)

* bytes_per_token: the GGUF's tensor bytes, except the token embedding (a lookup reads one row
  per token), unless the model ties its output to it (no `output.weight`), in which case the
  embedding is read whole for the logits; for mixture-of-experts models, the expert tensors
  (`*_exps`) weighted by expert_used_count / expert_count, the share of experts a token visits;
* share_g: the part of the weights on GPU g, assumed proportional to the llama-server process's
  memory on that GPU (with a layer split, `-ts`, its KV cache and buffers follow the layers);
* bandwidth_g: NVML's memory bus width times its maximum memory clock times 2 (NVML reports
  GDDR and HBM clocks at half the per-pin data rate: an RTX 3060's 7,501 MHz on 192 bits gives
  360 GB/s, an H100 SXM's 2,619 MHz on 5,120 bits 3.35 TB/s).

What it leaves out makes it an upper bound: the KV cache read per token (small at short
depths, growing with context), activations, kernel launch gaps, and weights that are not in
GPU memory at all (`-ngl` below the layer count, `--n-cpu-moe`): such a setup reads part of its
weights from system RAM, and its real ceiling is far lower than this one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from exporter.kv.gguf_meta import ModelMeta

# NVML's memory clock is half the data rate per pin for the DDR-type memories GPUs use.
_TRANSFERS_PER_CLOCK = 2


@dataclass(frozen=True)
class GpuShare:
    memory_bytes: int  # the server process's memory on this GPU
    bus_width_bits: int
    max_memory_clock_mhz: int

    @property
    def bandwidth_bytes_per_second(self) -> float:
        return self.bus_width_bits / 8 * self.max_memory_clock_mhz * 1e6 * _TRANSFERS_PER_CLOCK


def bytes_read_per_token(meta: ModelMeta) -> int:
    names = {t.name for t in meta.tensors}
    tied_output = "output.weight" not in names
    expert_count = meta.get(meta.arch_key("expert_count"))
    expert_used = meta.get(meta.arch_key("expert_used_count"))
    expert_share = 1.0
    if isinstance(expert_count, int) and isinstance(expert_used, int) and expert_count > 0:
        expert_share = min(expert_used, expert_count) / expert_count
    total = 0.0
    for t in meta.tensors:
        if t.name == "token_embd.weight" and not tied_output:
            continue
        total += t.n_bytes * (expert_share if "_exps." in t.name else 1.0)
    return round(total)


def generation_ceiling(bytes_per_token: int, gpus: Sequence[GpuShare]) -> float | None:
    """Tokens per second the memory bandwidth allows; None without a usable split."""
    held = sum(g.memory_bytes for g in gpus)
    if held <= 0 or bytes_per_token <= 0:
        return None
    seconds = 0.0
    for g in gpus:
        if g.memory_bytes <= 0:
            continue
        if g.bandwidth_bytes_per_second <= 0:
            return None
        seconds += bytes_per_token * (g.memory_bytes / held) / g.bandwidth_bytes_per_second
    return 1.0 / seconds if seconds > 0 else None
