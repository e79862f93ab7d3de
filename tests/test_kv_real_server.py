"""The KV-cache calculator against what a real llama-server (b11434) allocates.

Each case starts llama-server with `-lv 4` on a generated tiny model and compares every
`llama_kv_cache: size = ...` line (two for a sliding-window model) and the recurrent-state line
of a hybrid model with the calculator's numbers. The calculator gets the server's own command
line, so the argument parser is checked end to end too.

`write_tiny_model` covers llama and gemma2; the qwen3next (hybrid recurrent) and deepseek2
(multi-head latent attention) models are written here with just the tensors b11434 loads.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import numpy.typing as npt
import pytest

from exporter.kv.facts import KvOverrides, model_facts
from exporter.llama.client import LlamaClient
from exporter.llama.discovery import ServerInfo, discover
from testbed.llama_server import LlamaServerProcess
from testbed.tiny_model import write_tiny_model
from tests.conftest import StartServer

pytestmark = pytest.mark.real_server

MIB = 1024 * 1024
# The log prints MiB with two decimals: a part can be off by half a hundredth from rounding.
PRINT_TOLERANCE_MIB = 0.005 + 1e-9
LOG_WAIT_S = 10.0

_KV_LINE = re.compile(
    r"llama_kv_cache: size = +(?P<mib>[\d.]+) MiB \( *(?P<cells>\d+) cells, +(?P<layers>\d+) "
    r"layers, +(?P<seqs>\d+)/(?P<streams>\d+) seqs\), K \((?P<type_k>\w+)\): +(?P<k_mib>[\d.]+) "
    r"MiB, V \((?P<type_v>\w+)\): +(?P<v_mib>[\d.]+) MiB"
)
_RS_LINE = re.compile(
    r"llama_memory_recurrent: size = +(?P<mib>[\d.]+) MiB \( *(?P<cells>\d+) cells, .*"
    r"R \(f32\): +(?P<r_mib>[\d.]+) MiB, S \(f32\): +(?P<s_mib>[\d.]+) MiB"
)
# server-context.cpp prints this after every cache is allocated.
_SLOTS_LINE = re.compile(r"initializing, n_slots = \d+")


@dataclass(frozen=True)
class LoggedKvCache:
    mib: float
    cells: int
    layers: int
    seqs: int
    streams: int
    type_k: str
    k_mib: float
    type_v: str
    v_mib: float


@dataclass(frozen=True)
class LoggedRecurrent:
    mib: float
    cells: int


def parse_kv_log(log: str) -> tuple[list[LoggedKvCache], list[LoggedRecurrent]]:
    """The KV-cache and recurrent-state size lines of a llama-server `-lv 4` log, in order."""
    caches = [
        LoggedKvCache(
            mib=float(m["mib"]),
            cells=int(m["cells"]),
            layers=int(m["layers"]),
            seqs=int(m["seqs"]),
            streams=int(m["streams"]),
            type_k=m["type_k"],
            k_mib=float(m["k_mib"]),
            type_v=m["type_v"],
            v_mib=float(m["v_mib"]),
        )
        for m in _KV_LINE.finditer(log)
    ]
    recurrent = [
        LoggedRecurrent(mib=float(m["mib"]), cells=int(m["cells"])) for m in _RS_LINE.finditer(log)
    ]
    return caches, recurrent


def wait_for_log(server: LlamaServerProcess, pattern: re.Pattern[str]) -> str:
    # The server logs through a worker thread, so a line may reach the file after /health is up.
    deadline = time.monotonic() + LOG_WAIT_S
    while True:
        text = server.log_text()
        if pattern.search(text) or time.monotonic() > deadline:
            return text
        time.sleep(0.02)  # poll interval inside the deadline, not a wait for an event


def test_parse_kv_log_reads_both_iswa_lines() -> None:
    log = (
        "0.00.011 I llama_kv_cache: size =    4.00 MiB (  4096 cells,   2 layers,  1/1 seqs), "
        "K (f16):    2.00 MiB, V (f16):    2.00 MiB\n"
        "0.00.012 I llama_kv_cache: size =    0.75 MiB (   768 cells,   2 layers,  4/1 seqs), "
        "K (q8_0):    0.38 MiB, V (iq4_nl):    0.38 MiB\n"
        "0.00.013 I llama_memory_recurrent: size =    0.82 MiB (     2 cells,   8 layers,  2 seqs "
        " 0 rs_seq), R (f32):    0.07 MiB, S (f32):    0.75 MiB, P (f32):    0.00 MiB\n"
    )
    caches, recurrent = parse_kv_log(log)
    assert [c.cells for c in caches] == [4096, 768]
    assert caches[1] == LoggedKvCache(0.75, 768, 2, 4, 1, "q8_0", 0.38, "iq4_nl", 0.38)
    assert recurrent == [LoggedRecurrent(0.82, 2)]


# --- model writers for the architectures write_tiny_model does not cover ---------------------


def _vocabulary() -> tuple[list[bytes], list[float], list[int]]:
    # The smallest SentencePiece vocabulary llama.cpp accepts: specials, byte fallbacks and
    # letters, so that any prompt tokenizes.
    pieces = [b"<unk>", b"<s>", b"</s>", *(f"<0x{b:02X}>".encode() for b in range(256))]
    letters = ["\u2581", *"abcdefghijklmnopqrstuvwxyz"]
    pieces += [p.encode() for p in letters]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * len(letters)
    scores = [0.0] * (len(pieces) - len(letters)) + [-1.0] * len(letters)
    return pieces, scores, [int(t) for t in types]


class _Writer:
    """A GGUFWriter plus random tensors given in ggml order (ne[0] first)."""

    def __init__(self, path: Path, arch: str, *, n_embd: int, n_layer: int) -> None:
        self.path = path
        self.arch = arch
        self.rng = np.random.default_rng(0)
        self.pieces, self.scores, self.types = _vocabulary()
        self.n_vocab = len(self.pieces)
        self.w = gguf.GGUFWriter(path, arch)
        self.w.add_name(f"tiny-{arch}")
        self.w.add_file_type(gguf.LlamaFileType.ALL_F32)
        self.w.add_context_length(8192)
        self.w.add_embedding_length(n_embd)
        self.w.add_block_count(n_layer)
        self.w.add_layer_norm_rms_eps(1e-6)
        self.tensors: dict[str, npt.NDArray[np.float32]] = {}
        self.tensor("token_embd.weight", n_embd, self.n_vocab)
        self.tensor("output.weight", n_embd, self.n_vocab)
        self.tensor("output_norm.weight", n_embd)

    def tensor(self, name: str, *ne: int) -> None:
        # gguf-py reverses numpy shapes into ggml's order.
        shape = tuple(reversed(ne))
        self.tensors[name] = (self.rng.standard_normal(shape) * 0.02).astype(np.float32)

    def close(self) -> Path:
        self.w.add_tokenizer_model("llama")
        self.w.add_token_list(self.pieces)
        self.w.add_token_scores(self.scores)
        self.w.add_token_types(self.types)
        self.w.add_bos_token_id(1)
        self.w.add_eos_token_id(2)
        self.w.add_unk_token_id(0)
        for name, data in self.tensors.items():
            self.w.add_tensor(name, data)
        self.w.write_header_to_file()
        self.w.write_kv_data_to_file()
        self.w.write_tensors_to_file()
        self.w.close()
        return self.path


def write_qwen3next(path: Path, *, n_layer: int, recurrent_layers: list[bool] | None) -> Path:
    """A hybrid model: gated-delta-net layers with full attention every 4th layer (or as given)."""
    n_embd, n_head, n_head_kv, head = 64, 2, 2, 64
    n_expert, n_ff = 2, 32
    d_conv, d_state, n_group, dt_rank = 4, 64, 2, 4
    d_inner = d_state * dt_rank
    key_dim, value_dim = d_state * n_group, d_state * dt_rank
    out = _Writer(path, "qwen3next", n_embd=n_embd, n_layer=n_layer)
    w = out.w
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_key_length(head)
    w.add_value_length(head)
    w.add_rope_dimension_count(head)
    w.add_expert_count(n_expert)
    w.add_expert_used_count(1)
    w.add_expert_feed_forward_length(n_ff)
    w.add_expert_shared_feed_forward_length(n_ff)
    w.add_ssm_conv_kernel(d_conv)
    w.add_ssm_inner_size(d_inner)
    w.add_ssm_state_size(d_state)
    w.add_ssm_group_count(n_group)
    w.add_ssm_time_step_rank(dt_rank)
    if recurrent_layers is not None:
        w.add_array("qwen3next.attention.recurrent_layers", recurrent_layers)
    for il in range(n_layer):
        b = f"blk.{il}"
        recurrent = recurrent_layers[il] if recurrent_layers is not None else (il + 1) % 4 != 0
        out.tensor(f"{b}.attn_norm.weight", n_embd)
        out.tensor(f"{b}.post_attention_norm.weight", n_embd)
        if recurrent:
            out.tensor(f"{b}.attn_qkv.weight", n_embd, key_dim * 2 + value_dim)
            out.tensor(f"{b}.attn_gate.weight", n_embd, value_dim)
            out.tensor(f"{b}.ssm_conv1d.weight", d_conv, key_dim * 2 + value_dim)
            out.tensor(f"{b}.ssm_dt.bias", dt_rank)
            out.tensor(f"{b}.ssm_a", dt_rank)
            out.tensor(f"{b}.ssm_ba.weight", n_embd, dt_rank * 2)
            out.tensor(f"{b}.ssm_norm.weight", d_state)
            out.tensor(f"{b}.ssm_out.weight", value_dim, n_embd)
        else:
            out.tensor(f"{b}.attn_q.weight", n_embd, head * n_head * 2)
            out.tensor(f"{b}.attn_k.weight", n_embd, head * n_head_kv)
            out.tensor(f"{b}.attn_v.weight", n_embd, head * n_head_kv)
            out.tensor(f"{b}.attn_output.weight", head * n_head, n_embd)
            out.tensor(f"{b}.attn_q_norm.weight", head)
            out.tensor(f"{b}.attn_k_norm.weight", head)
        out.tensor(f"{b}.ffn_gate_inp.weight", n_embd, n_expert)
        out.tensor(f"{b}.ffn_gate_exps.weight", n_embd, n_ff, n_expert)
        out.tensor(f"{b}.ffn_up_exps.weight", n_embd, n_ff, n_expert)
        out.tensor(f"{b}.ffn_down_exps.weight", n_ff, n_embd, n_expert)
        out.tensor(f"{b}.ffn_gate_inp_shexp.weight", n_embd)
        out.tensor(f"{b}.ffn_gate_shexp.weight", n_embd, n_ff)
        out.tensor(f"{b}.ffn_up_shexp.weight", n_embd, n_ff)
        out.tensor(f"{b}.ffn_down_shexp.weight", n_ff, n_embd)
    return out.close()


def write_deepseek2(path: Path, *, n_layer: int, mla: bool, nextn: int = 0) -> Path:
    """Dense deepseek2 layers, converted for MLA (latent K, no V) or per-head K and V."""
    n_embd, n_head, n_ff = 64, 2, 64
    kv_lora, rope, nope, v_head, q_lora = 64, 32, 32, 32, 32
    out = _Writer(path, "deepseek2", n_embd=n_embd, n_layer=n_layer)
    w = out.w
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_leading_dense_block_count(n_layer)
    w.add_q_lora_rank(q_lora)
    w.add_kv_lora_rank(kv_lora)
    w.add_rope_dimension_count(rope)
    w.add_expert_feed_forward_length(n_ff)
    w.add_expert_shared_count(0)
    w.add_vocab_size(out.n_vocab)
    if nextn:
        w.add_uint32("deepseek2.nextn_predict_layers", nextn)
    if mla:
        # What conversion/deepseek.py writes: one latent "head" of kv_lora_rank + RoPE dims.
        w.add_head_count_kv(1)
        w.add_key_length(kv_lora + rope)
        w.add_value_length(kv_lora)
        w.add_key_length_mla(nope + rope)
        w.add_value_length_mla(v_head)
    else:
        w.add_head_count_kv(n_head)
        w.add_key_length(nope + rope)
        w.add_value_length(v_head)
    for il in range(n_layer):
        b = f"blk.{il}"
        out.tensor(f"{b}.attn_norm.weight", n_embd)
        out.tensor(f"{b}.attn_q_a_norm.weight", q_lora)
        out.tensor(f"{b}.attn_kv_a_norm.weight", kv_lora)
        out.tensor(f"{b}.attn_q_a.weight", n_embd, q_lora)
        out.tensor(f"{b}.attn_q_b.weight", q_lora, n_head * (nope + rope))
        out.tensor(f"{b}.attn_kv_a_mqa.weight", n_embd, kv_lora + rope)
        if mla:
            out.tensor(f"{b}.attn_k_b.weight", nope, kv_lora, n_head)
            out.tensor(f"{b}.attn_v_b.weight", kv_lora, v_head, n_head)
        else:
            out.tensor(f"{b}.attn_kv_b.weight", kv_lora, n_head * (nope + v_head))
        out.tensor(f"{b}.attn_output.weight", n_head * v_head, n_embd)
        out.tensor(f"{b}.ffn_norm.weight", n_embd)
        out.tensor(f"{b}.ffn_gate.weight", n_embd, n_ff)
        out.tensor(f"{b}.ffn_up.weight", n_embd, n_ff)
        out.tensor(f"{b}.ffn_down.weight", n_ff, n_embd)
        if il >= n_layer - nextn:
            out.tensor(f"{b}.nextn.eh_proj.weight", 2 * n_embd, n_embd)
            out.tensor(f"{b}.nextn.enorm.weight", n_embd)
            out.tensor(f"{b}.nextn.hnorm.weight", n_embd)
    return out.close()


_MODELS: dict[str, Callable[[Path], Path]] = {
    # GQA, head 64.
    "llama-gqa64": lambda p: write_tiny_model(p, n_layer=4, n_embd=256, n_head=4, n_head_kv=2),
    # Plain multi-head attention, head 32, 3 layers.
    "llama-mha32": lambda p: write_tiny_model(p, n_layer=3, n_embd=128, n_head=4, n_head_kv=4),
    # Every second layer (0, 2) uses a 256-token window; head 32.
    "gemma2-swa256": lambda p: write_tiny_model(
        p, n_layer=4, n_embd=256, n_head=8, n_head_kv=2, n_ff=256, sliding_window=256
    ),
    # Six layers, one KV head of 64, a 128-token window.
    "gemma2-swa128": lambda p: write_tiny_model(
        p, n_layer=6, n_embd=192, n_head=3, n_head_kv=1, n_ff=256, sliding_window=128
    ),
    # Attention at layers 3 and 7, recurrent state for the other six.
    "qwen3next-interval": lambda p: write_qwen3next(p, n_layer=8, recurrent_layers=None),
    "qwen3next-array": lambda p: write_qwen3next(
        p, n_layer=5, recurrent_layers=[True, False, True, True, False]
    ),
    "deepseek2-mla-nextn": lambda p: write_deepseek2(p, n_layer=3, mla=True, nextn=1),
    "deepseek2-mha": lambda p: write_deepseek2(p, n_layer=3, mla=False),
}


@dataclass(frozen=True)
class Case:
    model: str
    args: tuple[str, ...]


CASES: dict[str, Case] = {
    # -np auto: 4 slots sharing one unified cache.
    "llama-default-slots": Case("llama-gqa64", ("-c", "4096")),
    # 5000 -> 5120 -> 1706 per slot -> 1792 cells per stream.
    "llama-np3-split-q8_0-q4_0": Case(
        "llama-gqa64", ("-c", "5000", "-np", "3", "-ctk", "q8_0", "-ctv", "q4_0")
    ),
    "mha-np2-unified-q4_1-iq4_nl": Case(
        "llama-mha32", ("-c", "3000", "-np", "2", "-kvu", "-ctk", "q4_1", "-ctv", "iq4_nl")
    ),
    "mha-np1-f32-q5_1": Case(
        "llama-mha32", ("-c", "2048", "-np", "1", "-ctk", "f32", "-ctv", "q5_1")
    ),
    # SWA cache: 256 + 512 (n_ubatch) -> 768 cells.
    "gemma2-np1": Case("gemma2-swa256", ("-c", "4096", "-np", "1")),
    # Unified: 256 * 3 + 512 -> 1280 cells.
    "gemma2-np3-unified-q5_0-q8_0": Case(
        "gemma2-swa256", ("-c", "4096", "-np", "3", "-kvu", "-ctk", "q5_0", "-ctv", "q8_0")
    ),
    # 128 + 100 -> 256 cells per stream.
    "gemma2-np2-ub100-bf16": Case(
        "gemma2-swa128", ("-c", "8192", "-np", "2", "-ub", "100", "-ctk", "bf16")
    ),
    "gemma2-swa-full": Case("gemma2-swa128", ("-c", "4096", "-np", "2", "--swa-full")),
    "qwen3next-np2-q8_0-q4_0": Case(
        "qwen3next-interval", ("-c", "4096", "-np", "2", "-ctk", "q8_0", "-ctv", "q4_0")
    ),
    "qwen3next-array-np3-unified": Case("qwen3next-array", ("-c", "2048", "-np", "3", "-kvu")),
    # MLA needs equal K and V types; the NextN block is left out of the cache.
    "deepseek2-mla-q8_0": Case(
        "deepseek2-mla-nextn", ("-c", "4096", "-np", "1", "-ctk", "q8_0", "-ctv", "q8_0")
    ),
    "deepseek2-mha-np2": Case("deepseek2-mha", ("-c", "4096", "-np", "2")),
}


@pytest.fixture(scope="module")
def kv_models(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    root = tmp_path_factory.mktemp("kv-models")
    written: dict[str, Path] = {}

    def model(name: str) -> Path:
        if name not in written:
            written[name] = _MODELS[name](root / f"{name}.gguf")
        return written[name]

    return model


def _close(logged_mib: float, computed_bytes: int) -> bool:
    return abs(logged_mib - computed_bytes / MIB) <= PRINT_TOLERANCE_MIB


async def discover_once(url: str) -> ServerInfo:
    client = LlamaClient(url)
    try:
        return await discover(client)
    finally:
        await client.aclose()


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_capacity_matches_llama_server_log(
    case: Case, kv_models: Callable[[str], Path], llama_server: StartServer
) -> None:
    model = kv_models(case.model)
    server = llama_server(*case.args, "-lv", "4", model=model)
    logged, logged_recurrent = parse_kv_log(wait_for_log(server, _SLOTS_LINE))

    # The path /metrics serves: the server's /props and its command line, through model_facts.
    info = asyncio.run(discover_once(server.url))
    facts = model_facts(info, KvOverrides(), server.command(), {})
    cap = facts.capacity
    assert cap is not None

    assert len(logged) == len(cap.parts), logged
    for part, line in zip(cap.parts, logged, strict=True):
        details: Any = (part, line)
        assert line.cells == part.cells, details
        assert line.layers == part.n_layers, details
        assert (line.seqs, line.streams) == (cap.n_seq, part.n_stream), details
        assert (line.type_k, line.type_v) == (facts.type_k, facts.type_v), details
        assert _close(line.k_mib, part.k_bytes), details
        assert _close(line.v_mib, part.v_bytes), details
        assert _close(line.mib, part.bytes), details
    logged_total = sum(line.mib for line in logged) * MIB
    assert cap.bytes == pytest.approx(logged_total, rel=0.01)

    if cap.recurrent_bytes:
        assert len(logged_recurrent) == 1, logged_recurrent
        assert logged_recurrent[0].cells == cap.n_seq
        assert _close(logged_recurrent[0].mib, cap.recurrent_bytes)
        assert cap.recurrent_bytes == pytest.approx(logged_recurrent[0].mib * MIB, rel=0.01)
    else:
        assert logged_recurrent == []
