"""What a target's KV cache is, from its GGUF header, its server's options and `/props`.

Worked out once per model (at discovery), not per scrape: the header read and the arithmetic
do not change while the same server serves the same model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final

from exporter.frozen import Frozen
from exporter.kv.cache import (
    KvCacheError,
    KvCapacity,
    KvGeometry,
    UnknownArchitecture,
    UnknownCacheTypeError,
    bytes_per_token,
    capacity,
)
from exporter.kv.ceiling import bytes_read_per_token
from exporter.kv.gguf_meta import ModelFileError, read_model_meta
from exporter.kv.server_args import KvServerArgs, ServerArgsError, server_kv_args
from exporter.llama.discovery import ServerInfo

# Reasons for llama_speed_kv_cache_errors_total.
MODEL_UNREADABLE: Final = "model_unreadable"
MODEL_INVALID: Final = "model_invalid"
UNKNOWN_ARCHITECTURE: Final = "unknown_architecture"
UNKNOWN_CACHE_TYPE: Final = "unknown_cache_type"
BAD_SERVER_ARGS: Final = "bad_server_args"
KV_REASONS: Final = (
    MODEL_UNREADABLE,
    MODEL_INVALID,
    UNKNOWN_ARCHITECTURE,
    UNKNOWN_CACHE_TYPE,
    BAD_SERVER_ARGS,
)


@dataclass(frozen=True)
class KvOverrides:
    """What the config file says about a target's KV cache; it beats the process's options."""

    model_path: Path | None = None
    cache_type_k: str | None = None
    cache_type_v: str | None = None
    kv_unified: bool | None = None


@dataclass(frozen=True)
class ModelFacts(Frozen):
    """The KV cache and weight traffic of one served model; capacity needs the cache layout."""

    type_k: str
    type_v: str
    bytes_per_token: int
    capacity: KvCapacity | None  # None where the cache layout (unified or not) is unknown
    weight_bytes_per_token: int  # what generating one token reads, for the speed ceiling


class FactsError(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def served_model_path(model_path: str, server_cwd: Path | None) -> Path:
    """Where the served model is, seen from here: llama-server reports `-m` as it was given,
    and a relative path is relative to the server's working directory, not the exporter's.
    Without that directory (the process is not visible) the path is taken as it stands."""
    path = Path(model_path)
    if server_cwd is not None and not path.is_absolute():
        return server_cwd / path
    return path


def model_facts(
    info: ServerInfo,
    overrides: KvOverrides,
    argv: list[str] | None,
    environ: dict[str, str] | None,
    *,
    server_cwd: Path | None = None,
) -> ModelFacts:
    """The one mapping from a served model and its server's options to its KV cache.

    /metrics, `bench` and the tests that compare with llama-server's own log all use it.
    `server_cwd` is the server process's working directory, for a relative model path.
    Raises FactsError with one of KV_REASONS.
    """
    path = overrides.model_path or served_model_path(info.model_path, server_cwd)
    try:
        meta = read_model_meta(path)
    except ModelFileError as exc:
        reason = MODEL_UNREADABLE if exc.unreadable else MODEL_INVALID
        raise FactsError(reason, str(exc)) from None
    args: KvServerArgs | None = None
    if argv is not None:
        try:
            args = server_kv_args(argv[1:], environ or {})
        except ServerArgsError as exc:
            raise FactsError(BAD_SERVER_ARGS, str(exc)) from None
    type_k = overrides.cache_type_k or (args.type_k if args else "f16")
    type_v = overrides.cache_type_v or (args.type_v if args else "f16")
    unified = overrides.kv_unified if overrides.kv_unified is not None else (
        args.kv_unified if args else None
    )  # fmt: skip
    try:
        geometry = KvGeometry.from_meta(meta)
        flash_attn = args.flash_attn != "off" if args else True
        per_token = bytes_per_token(geometry, type_k, type_v, flash_attn=flash_attn)
        cap = None
        if unified is not None:
            # /props gives the context after --fit; per slot, which is the pool when unified.
            n_ctx = info.ctx if unified else info.ctx * info.slots
            if args is not None and args.effective_ctx_size > 0:
                # An explicit -c is what llama.cpp allocates, even where the server then caps
                # each slot at the model's training context and /props shows the cap.
                n_ctx = args.effective_ctx_size
            cap = capacity(
                geometry,
                n_ctx=n_ctx,
                n_seq=info.slots,
                unified=unified,
                type_k=type_k,
                type_v=type_v,
                swa_full=args.swa_full if args else False,
                n_batch=args.n_batch if args else 2048,
                n_ubatch=args.n_ubatch if args else 512,
                flash_attn=flash_attn,
            )
    except UnknownArchitecture as exc:
        raise FactsError(UNKNOWN_ARCHITECTURE, str(exc)) from None
    except UnknownCacheTypeError as exc:
        raise FactsError(UNKNOWN_CACHE_TYPE, str(exc)) from None
    except KvCacheError as exc:
        raise FactsError(MODEL_INVALID, str(exc)) from None
    return ModelFacts(
        type_k=type_k,
        type_v=type_v,
        bytes_per_token=per_token,
        capacity=cap,
        weight_bytes_per_token=bytes_read_per_token(meta),
    )
