"""A tiny random-weight GGUF model that a real llama-server loads and serves.

Tests need a llama-server that behaves like the real thing (timings, slots, KV-cache log lines)
without downloading weights. A few megabytes of F32 noise is enough: the text it generates is
garbage, but every code path in the server runs and the timings are real.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final

import gguf
import numpy as np
import numpy.typing as npt

# llama.cpp's `llama` architecture ignores `attention.sliding_window`, so a sliding-window model
# has to be an architecture that reads it. gemma2 is the smallest such graph: the same tensors
# as llama plus two extra norms per block, and a fixed pattern where every second layer uses
# the sliding window (layers 0, 2, ...) and the others attend to the whole context.
_SWA_ARCH: Final = "gemma2"
_ARCH: Final = "llama"

_RMS_EPS: Final = 1e-5
_WEIGHT_SCALE: Final = 0.02

# SentencePiece marks a leading space with U+2581. llama.cpp's SPM tokenizer only merges two
# symbols whose concatenation is itself a piece, so every prefix of a word is a piece too:
# otherwise the words could never be reached and all text would come out as letters.
_WORDS: Final = ("the", "and", "of", "to", "in", "is", "it", "that", "for", "llama", "speed")
_LETTERS: Final = "abcdefghijklmnopqrstuvwxyz"


def _vocabulary() -> tuple[list[bytes], list[float], list[int]]:
    """Pieces, scores and token types of a SentencePiece-style vocabulary."""
    pieces: list[bytes] = [b"<unk>", b"<s>", b"</s>"]
    types: list[int] = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    # Byte tokens let the tokenizer encode any text, so no prompt can fail to tokenize.
    pieces += [f"<0x{b:02X}>".encode() for b in range(256)]
    types += [gguf.TokenType.BYTE] * 256
    normal = ["\u2581", *_LETTERS]
    for word in _WORDS:
        spelled = f"\u2581{word}"
        normal += [spelled[:n] for n in range(2, len(spelled) + 1) if spelled[:n] not in normal]
    pieces += [p.encode() for p in normal]
    types += [gguf.TokenType.NORMAL] * len(normal)
    # The tokenizer merges the best-scoring pair first; longer pieces scoring higher makes it
    # prefer whole words. Specials and bytes are never merge results, so their score is unused.
    scores = [0.0] * (3 + 256) + [float(len(p)) - 100.0 for p in normal]
    return pieces, scores, [int(t) for t in types]


@dataclass(frozen=True)
class _Geometry:
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int
    context_length: int
    sliding_window: int | None

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def arch(self) -> str:
        return _ARCH if self.sliding_window is None else _SWA_ARCH

    def check(self) -> None:
        sizes = (self.n_layer, self.n_embd, self.n_head, self.n_head_kv, self.n_ff)
        if min(*sizes, self.context_length) <= 0:
            raise ValueError("model dimensions must be positive")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not a multiple of n_head {self.n_head}")
        if self.n_head % self.n_head_kv:
            raise ValueError(
                f"n_head {self.n_head} is not a multiple of n_head_kv {self.n_head_kv}"
            )
        if self.head_dim % 2:
            # RoPE rotates pairs of dimensions.
            raise ValueError(f"head dimension {self.head_dim} must be even")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError("sliding_window must be positive")


def _tensors(
    geo: _Geometry, n_vocab: int, rng: np.random.Generator
) -> dict[str, npt.NDArray[np.float32]]:
    def weight(*shape: int) -> npt.NDArray[np.float32]:
        return (rng.standard_normal(shape) * _WEIGHT_SCALE).astype(np.float32)

    def ones(n: int) -> npt.NDArray[np.float32]:
        return np.ones(n, dtype=np.float32)

    n_embd, n_ff = geo.n_embd, geo.n_ff
    n_embd_kv = geo.head_dim * geo.n_head_kv
    # gguf-py reverses numpy shapes into ggml's ne order, so a (rows, cols) array here is a
    # ggml tensor of ne=[cols, rows]: each matrix is written as (n_out, n_in).
    tensors = {
        "token_embd.weight": weight(n_vocab, n_embd),
        "output_norm.weight": ones(n_embd),
    }
    if geo.arch == _ARCH:
        # gemma2 ties the output projection to token_embd and rejects a separate one.
        tensors["output.weight"] = weight(n_vocab, n_embd)
    for i in range(geo.n_layer):
        blk = f"blk.{i}"
        tensors |= {
            f"{blk}.attn_norm.weight": ones(n_embd),
            f"{blk}.attn_q.weight": weight(n_embd, n_embd),
            f"{blk}.attn_k.weight": weight(n_embd_kv, n_embd),
            f"{blk}.attn_v.weight": weight(n_embd_kv, n_embd),
            f"{blk}.attn_output.weight": weight(n_embd, n_embd),
            f"{blk}.ffn_norm.weight": ones(n_embd),
            f"{blk}.ffn_gate.weight": weight(n_ff, n_embd),
            f"{blk}.ffn_up.weight": weight(n_ff, n_embd),
            f"{blk}.ffn_down.weight": weight(n_embd, n_ff),
        }
        if geo.arch == _SWA_ARCH:
            tensors |= {
                f"{blk}.post_attention_norm.weight": ones(n_embd),
                f"{blk}.post_ffw_norm.weight": ones(n_embd),
            }
    return tensors


def write_tiny_model(
    path: Path,
    *,
    n_layer: int = 4,
    n_embd: int = 256,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 512,
    context_length: int = 8192,
    name: str = "tiny",
    seed: int = 0,
    sliding_window: int | None = None,
) -> Path:
    """Write a random-weight F32 model to `path` and return `path`.

    The model is a `llama` architecture unless `sliding_window` is given; then it is `gemma2`,
    whose every second layer (0, 2, ...) attends only to the last `sliding_window` tokens.
    The head dimension is `n_embd // n_head`, for keys and values alike.
    """
    geo = _Geometry(n_layer, n_embd, n_head, n_head_kv, n_ff, context_length, sliding_window)
    geo.check()
    pieces, scores, types = _vocabulary()
    tensors = _tensors(geo, len(pieces), np.random.default_rng(seed))

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(path, geo.arch)
    try:
        writer.add_name(name)
        writer.add_file_type(gguf.LlamaFileType.ALL_F32)
        writer.add_context_length(context_length)
        writer.add_embedding_length(n_embd)
        writer.add_block_count(n_layer)
        writer.add_feed_forward_length(n_ff)
        writer.add_head_count(n_head)
        writer.add_head_count_kv(n_head_kv)
        # Written explicitly, so that the KV-cache size a test computes from these arguments
        # cannot drift from what llama.cpp would derive on its own.
        writer.add_key_length(geo.head_dim)
        writer.add_value_length(geo.head_dim)
        writer.add_rope_dimension_count(geo.head_dim)
        writer.add_layer_norm_rms_eps(_RMS_EPS)
        if sliding_window is not None:
            writer.add_sliding_window(sliding_window)

        writer.add_tokenizer_model("llama")
        writer.add_token_list(pieces)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_unk_token_id(0)

        for tensor_name, data in tensors.items():
            writer.add_tensor(tensor_name, data)

        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return path
