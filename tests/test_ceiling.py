"""The memory-bandwidth bound on TG, from GGUF tensor sizes and NVML's bus width and clock."""

from __future__ import annotations

from pathlib import Path

import pytest

from exporter.kv.ceiling import GpuShare, bytes_read_per_token, generation_ceiling
from exporter.kv.gguf_meta import (
    GGML_TYPES_BY_NAME,
    MetaValue,
    ModelMeta,
    TensorInfo,
    read_model_meta,
)
from testbed.tiny_model import write_tiny_model
from tests.model_meta import meta_of

Q4 = GGML_TYPES_BY_NAME["q4_0"]
F32 = GGML_TYPES_BY_NAME["f32"]
RTX_3060 = {"bus_width_bits": 192, "max_memory_clock_mhz": 7501}


def tensor(name: str, *shape: int, kind: str = "q4_0") -> TensorInfo:
    return TensorInfo(name, GGML_TYPES_BY_NAME[kind], shape, 0)


def moe_model(output: bool = True) -> ModelMeta:
    tensors = [
        tensor("token_embd.weight", 2048, 1000),  # 1,152,000 B
        tensor("blk.0.attn_q.weight", 2048, 2048),  # 2,359,296 B
        tensor("blk.0.ffn_gate_exps.weight", 2048, 512, 64),  # 37,748,736 B over 64 experts
        tensor("blk.0.ffn_gate_shexp.weight", 2048, 512),  # 589,824 B, every token
        tensor("blk.0.attn_norm.weight", 2048, kind="f32"),  # 8,192 B
    ]
    if output:
        tensors.append(tensor("output.weight", 2048, 1000))  # 1,152,000 B
    meta: dict[str, MetaValue] = {"general.architecture": "qwen3moe",
                                  "qwen3moe.expert_count": 64,
                                  "qwen3moe.expert_used_count": 8}  # fmt: skip
    return meta_of(meta, tensors)


def test_bytes_per_token_weighs_experts_and_skips_the_embedding_lookup() -> None:
    expected = 2_359_296 + 37_748_736 * 8 / 64 + 589_824 + 8_192 + 1_152_000
    assert bytes_read_per_token(moe_model()) == round(expected)


def test_tied_output_reads_the_embedding_whole() -> None:
    expected = 1_152_000 + 2_359_296 + 37_748_736 * 8 / 64 + 589_824 + 8_192
    assert bytes_read_per_token(moe_model(output=False)) == round(expected)


def test_dense_model_file_reads_every_weight_but_the_embedding(tmp_path: Path) -> None:
    meta = read_model_meta(write_tiny_model(tmp_path / "m.gguf"))
    embedding = next(t.n_bytes for t in meta.tensors if t.name == "token_embd.weight")
    assert bytes_read_per_token(meta) == sum(t.n_bytes for t in meta.tensors) - embedding


def test_rtx_3060_bandwidth_is_360_gb_per_second() -> None:
    assert GpuShare(1, **RTX_3060).bandwidth_bytes_per_second == pytest.approx(360.048e9)


def test_split_over_two_gpus_follows_the_process_memory() -> None:
    # The owner's box: 18.2 GB of weights, split 9.4 / 8.8 GB over two RTX 3060.
    gpus = [GpuShare(9_400_000_000, **RTX_3060), GpuShare(8_800_000_000, **RTX_3060)]
    ceiling = generation_ceiling(18_200_000_000, gpus)
    # Same cards: the split does not matter, the whole file is read at 360 GB/s.
    assert ceiling == pytest.approx(360.048e9 / 18.2e9)
    slower = [GpuShare(9_100_000_000, **RTX_3060),
              GpuShare(9_100_000_000, bus_width_bits=128, max_memory_clock_mhz=7501)]  # fmt: skip
    # Half the bytes at 360 GB/s, half at 240 GB/s.
    assert generation_ceiling(18_200_000_000, slower) == pytest.approx(
        1 / (9.1e9 / 360.048e9 + 9.1e9 / 240.032e9)
    )


def test_no_memory_or_no_bandwidth_gives_no_ceiling() -> None:
    assert generation_ceiling(1000, []) is None
    assert generation_ceiling(1000, [GpuShare(0, **RTX_3060)]) is None
    assert (
        generation_ceiling(1000, [GpuShare(10, bus_width_bits=0, max_memory_clock_mhz=1)]) is None
    )
