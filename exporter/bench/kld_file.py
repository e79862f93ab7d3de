"""The baseline's distributions: llama-perplexity's `--kl-divergence-base` file, and its sidecar.

The file (llama.cpp b11434 `tools/perplexity/perplexity.cpp`) is, little-endian:

    "_logits_"               8 bytes
    n_ctx, n_vocab, n_chunk  int32 each
    tokens                   n_chunk × n_ctx int32: the text's tokens, which a KL divergence
                             run reads instead of the text
    per chunk, for each of the n_ctx - 1 - n_ctx/2 scored tokens: two floats (scale, minimum)
                             and one uint16 per vocabulary entry, rounded up to an even count

so it grows with the vocabulary times the tokens: about 2 bytes per vocabulary entry per scored
token, gigabytes for a 150k-token vocabulary over a few thousand tokens. The bench says how
much before it writes one (`estimated_bytes`).

A file given again (`--quality-baseline FILE.kld`) must have been made from the same text and
context, or its KL divergences mean nothing. The file holds neither the text nor its name, so
the bench writes a sidecar beside it, `FILE.kld.json`: the baseline's record, with the text's
sha256, and checks both before it uses the file.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from pydantic import ValidationError

from exporter.bench.files import write_private
from exporter.bench.record import QualityBaselineRecord

MAGIC: Final = b"_logits_"
_HEADER: Final = struct.Struct("<8siii")
_TOKEN_BYTES: Final = 4
SIDECAR_SCHEMA: Final = "llama-speed-exporter/quality-baseline/v1"
SIDECAR_SUFFIX: Final = ".json"
_HASH_BLOCK: Final = 1 << 20


class BaselineFileError(ValueError):
    """A baseline file or its sidecar that cannot be used: why, in one line."""


@dataclass(frozen=True)
class TextInfo:
    """The quality text as the records name it: file name, size and content hash."""

    path: Path
    name: str
    size: int
    sha256: str

    @classmethod
    def of(cls, path: Path) -> TextInfo:
        digest = hashlib.sha256()
        size = 0
        with path.open("rb") as file:
            while block := file.read(_HASH_BLOCK):
                digest.update(block)
                size += len(block)
        return cls(path=path, name=path.name, size=size, sha256=digest.hexdigest())


@dataclass(frozen=True)
class LogitsHeader:
    n_ctx: int
    n_vocab: int
    n_chunk: int


def scored_tokens(ctx: int) -> int:
    """Tokens of a chunk that llama-perplexity scores: the second half, less the last."""
    return ctx - 1 - ctx // 2


def _row_values(n_vocab: int) -> int:
    # Two floats (four uint16) of scale and minimum, then the vocabulary rounded up to even.
    return 2 * ((n_vocab + 1) // 2) + 4


def file_bytes(n_vocab: int, ctx: int, n_chunk: int) -> int:
    """The size of a complete file of `n_chunk` chunks."""
    tokens = n_chunk * ctx * _TOKEN_BYTES
    log_probs = n_chunk * scored_tokens(ctx) * _row_values(n_vocab) * 2
    return _HEADER.size + tokens + log_probs


def max_chunks(ctx: int, chunks: int, text_bytes: int) -> int:
    """The most chunks a text can give: no tokenizer makes more tokens than bytes, plus the
    beginning-of-text token and a leading space."""
    return max(0, min(chunks, (text_bytes + 2) // ctx))


def read_header(path: Path) -> LogitsHeader:
    """The header of a baseline file, checked against the file's size."""
    try:
        with path.open("rb") as file:
            head = file.read(_HEADER.size)
            size = file.seek(0, 2)
    except OSError as exc:
        raise BaselineFileError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if not head.startswith(MAGIC):
        raise BaselineFileError(f"{path}: not a llama-perplexity --kl-divergence-base file")
    if len(head) < _HEADER.size:
        raise BaselineFileError(
            f"{path}: holds no tokens ({size} bytes): llama-perplexity stopped before it wrote "
            "any (a text shorter than 2 × ctx tokens?)"
        )
    _, n_ctx, n_vocab, n_chunk = _HEADER.unpack(head)
    if n_ctx <= 0 or n_vocab <= 0 or n_chunk <= 0:
        raise BaselineFileError(
            f"{path}: header says n_ctx {n_ctx}, n_vocab {n_vocab}, n_chunk {n_chunk}"
        )
    expected = file_bytes(n_vocab, n_ctx, n_chunk)
    if size != expected:
        raise BaselineFileError(
            f"{path}: {size} bytes where {n_chunk} chunks of {n_ctx} tokens over a "
            f"{n_vocab}-token vocabulary take {expected}: incomplete"
        )
    return LogitsHeader(n_ctx=n_ctx, n_vocab=n_vocab, n_chunk=n_chunk)


def sidecar_path(logits: Path) -> Path:
    return logits.with_name(logits.name + SIDECAR_SUFFIX)


def write_sidecar(logits: Path, record: QualityBaselineRecord) -> None:
    data = {"schema": SIDECAR_SCHEMA, **record.model_dump(mode="json")}
    write_private(sidecar_path(logits), json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def read_sidecar(logits: Path) -> QualityBaselineRecord:
    path = sidecar_path(logits)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BaselineFileError(
            f"{logits}: no {path.name} beside it, which says what text and context it was made "
            "from; give the baseline model instead, and the bench makes a new one"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BaselineFileError(f"{path}: unreadable: {exc}") from None
    if not isinstance(data, dict) or data.get("schema") != SIDECAR_SCHEMA:
        raise BaselineFileError(f"{path}: not a bench baseline sidecar ({SIDECAR_SCHEMA})")
    try:
        return QualityBaselineRecord.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise BaselineFileError(f"{path}: {where}: {first['msg']}") from None


def check_reuse(
    logits: Path, text: TextInfo, ctx: int | None, chunks: int | None
) -> QualityBaselineRecord:
    """The record of an earlier bench's baseline file, if it fits this bench; else raise."""
    made = read_sidecar(logits)
    header = read_header(logits)
    if made.text_sha256 != text.sha256:
        raise BaselineFileError(
            f"{logits} was made from another text ({made.text}, sha256 {made.text_sha256[:12]}…; "
            f"{text.name} is {text.sha256[:12]}…)"
        )
    if header.n_ctx != made.ctx:
        raise BaselineFileError(f"{logits}: n_ctx {header.n_ctx}, its sidecar says {made.ctx}")
    if ctx is not None and ctx != made.ctx:
        raise BaselineFileError(f"{logits} was made with --quality-ctx {made.ctx}, not {ctx}")
    if chunks is not None and chunks != made.chunks:
        raise BaselineFileError(
            f"{logits} was made with --quality-chunks {made.chunks}, not {chunks}"
        )
    return made.model_copy(
        update={
            "status": "reused",
            "reason": "",
            "logits_file": str(logits),
            "logits_bytes": logits.stat().st_size,
            "n_chunk": header.n_chunk,
            "n_vocab": header.n_vocab,
        }
    )


def is_logits_file(path: Path) -> bool:
    """Whether `path` starts like a baseline file (else it is taken for a model)."""
    try:
        with path.open("rb") as file:
            return file.read(len(MAGIC)) == MAGIC
    except OSError:
        return False
