"""Which server a `bench --target` run measures: a llama-server, or one loaded model behind a
router or llama-swap, chosen by reads that name no model (docs/multi-model.md).

A bench must never load a model: on a shared box that evicts the one production uses, and it
would measure a cold start. So a model that is not loaded is refused before any request names
it, and without `--model` the bench takes the one loaded model, or asks which one.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import httpx

from exporter.host.address import local_port
from exporter.host.proc import find_listening_pid
from exporter.llama.argv import ArgvError, find_options
from exporter.llama.client import LlamaClient, ServerError
from exporter.llama.fleet import Fleet
from exporter.llama.redact import redacted_text
from exporter.llama.router import RouterModel, TargetKind, detect_kind
from exporter.llama.scoped import MultiKind
from exporter.llama.secret import Secret
from exporter.probe.once import RefusedError, check_served, loaded_model

__all__ = [
    "BenchTarget",
    "RefusedError",
    "SeveralModelsError",
    "choose_at",
    "choose_target",
    "model_pid",
]


class SeveralModelsError(ValueError):
    """Several models are loaded and none was named: a usage error, not a guess."""


@dataclass(frozen=True)
class BenchTarget:
    kind: TargetKind | None  # None: the target could not be asked; the run reports why
    model: RouterModel | None = None  # behind a router or llama-swap: the model measured

    def multi_kind(self) -> MultiKind | None:
        """The kind, where several models share the address; else None."""
        if self.kind in ("router", "llama-swap"):
            return self.kind
        return None


async def choose_target(client: LlamaClient, model: str | None, where: str) -> BenchTarget:
    """What `client`'s address serves, and the model to measure there.

    Raises `RefusedError` for a model that is not loaded (or not there), or when nothing is
    loaded; `SeveralModelsError` when several are and `model` is None; `ServerError` when the
    list of models cannot be read. Only `/props`, `/running` and the lists are read: none of
    them names a model, so nothing here can load one."""
    try:
        kind = await detect_kind(client)
    except ServerError:
        return BenchTarget(None)  # the run's first read fails the same way and says so
    if kind == "single":
        if model is not None:
            await check_served(client, model, where)
        return BenchTarget(kind)
    listed = {m.name: m for m in await Fleet(client, kind).models()}
    if model is None:
        loaded = sorted(name for name, m in listed.items() if m.loaded)
        if len(loaded) > 1:
            raise SeveralModelsError(
                f"{where} is a {kind} with several models loaded ({', '.join(loaded)}): "
                "name the one to measure with --model"
            )
        if not loaded:
            known = ", ".join(sorted(listed)) or "none"
            raise RefusedError(
                f"{where} is a {kind} with no model loaded (models: {known}), and bench will "
                "not load one: load a model first, then name it with --model"
            )
        model = loaded[0]
    return BenchTarget(kind, loaded_model(listed, model, where))


async def choose_at(
    url: str,
    api_key: Secret | None,
    model: str | None,
    *,
    timeout: float,
    transport: httpx.AsyncBaseTransport | None = None,
) -> BenchTarget:
    """`choose_target` over a client of its own."""
    client = LlamaClient(url, api_key, timeout=timeout, transport=transport)
    try:
        return await choose_target(client, model, redacted_text(url))
    finally:
        await client.aclose()


def model_pid(url: str, model: RouterModel) -> int | None:
    """The model's own process, where the target runs on this host: the one listening on the
    port of its command line (the router's or llama-swap's own process holds no weights)."""
    if local_port(url) is None:
        return None
    with contextlib.suppress(ArgvError):
        for option in find_options(model.args, {"--port": True}):
            # 0 until a router's child has started; llama-swap's `${PORT}` is not a number.
            if option.value is not None and option.value.isdigit() and int(option.value) > 0:
                return find_listening_pid(int(option.value)).pid
    return None
