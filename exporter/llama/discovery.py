"""What a llama-server is serving, from `/props` and `/v1/models`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

from exporter.frozen import Frozen
from exporter.llama.client import BAD_RESPONSE, ServerApi, ServerError
from exporter.llama.untrusted import MAX_SLOTS, MAX_TOKENS, bounded_int, clean_text

# PATH_MAX: a longer model_path is no path.
_MAX_PATH_CHARS = 4096


@dataclass(frozen=True)
class ServerInfo(Frozen):
    model: str  # the label: the alias, or the file's stem when the alias is a path
    model_path: str
    ctx: int  # per-slot context (llama-server's n_ctx_slot)
    slots: int
    quant: str
    build: str
    n_vocab: int
    n_params: int | None
    size_bytes: int | None
    n_ctx_train: int | None
    slots_endpoint: bool
    metrics_endpoint: bool
    sleeping: bool = False  # --sleep-idle-seconds: the model is unloaded until a request comes

    @property
    def identity(self) -> tuple[str, int]:
        """Results measured under another identity are not comparable and are dropped."""
        return (self.model, self.ctx)


def model_label(alias: str) -> str:
    """llama-server names a model by its `-m` path when no `--alias` is given; label its stem."""
    if "/" in alias or "\\" in alias or alias.lower().endswith(".gguf"):
        name = PurePath(alias.replace("\\", "/")).name
        return name[: -len(".gguf")] if name.lower().endswith(".gguf") else name
    return alias


def _opt_int(value: Any) -> int | None:
    """A figure the server may leave out; None where it is absent, not a count, or absurd."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not math.isfinite(value) or value < 0 or value != int(value) or value >= 2**63:
        return None
    return int(value)


def parse_server_info(props: Any, models: Any) -> ServerInfo:
    try:
        if not isinstance(props, dict):
            raise TypeError("/props is not a JSON object")
        entry = models["data"][0] if isinstance(models, dict) and models.get("data") else {}
        meta = entry.get("meta") or {}
        alias = str(props.get("model_alias") or entry.get("id") or props.get("model_path", ""))
        alias = alias[:_MAX_PATH_CHARS]
        ctx = bounded_int(props["default_generation_settings"]["n_ctx"], 1, MAX_TOKENS, "n_ctx")
        if "meta" not in entry or "n_vocab" not in meta:
            raise ValueError("/v1/models carries no meta.n_vocab")
        n_vocab = bounded_int(meta["n_vocab"], 1, MAX_TOKENS, "meta.n_vocab")
        model_path = str(props.get("model_path", ""))
        if len(model_path) > _MAX_PATH_CHARS or "\0" in model_path:
            raise ValueError("model_path is not a path")
        return ServerInfo(
            model=clean_text(model_label(alias)) or "unknown",
            model_path=model_path,
            ctx=ctx,
            slots=bounded_int(props.get("total_slots", 1), 1, MAX_SLOTS, "total_slots"),
            quant=clean_text(props.get("model_ftype") or meta.get("ftype") or "unknown"),
            build=clean_text(props.get("build_info", "unknown")),
            n_vocab=n_vocab,
            n_params=_opt_int(meta.get("n_params")),
            size_bytes=_opt_int(meta.get("size")),
            n_ctx_train=_opt_int(meta.get("n_ctx_train")),
            slots_endpoint=bool(props.get("endpoint_slots", True)),
            metrics_endpoint=bool(props.get("endpoint_metrics", False)),
            sleeping=bool(props.get("is_sleeping", False)),
        )
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        raise ServerError(BAD_RESPONSE, f"unexpected /props or /v1/models answer: {exc}") from None


async def discover(client: ServerApi) -> ServerInfo:
    props = await client.get_json("/props")
    models = await client.get_json("/v1/models")
    return parse_server_info(props, models)
