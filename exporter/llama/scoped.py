"""One model behind a router or llama-swap, spoken to as if it were a llama-server of its own.

The prober (`ProbeRunner`, discovery, the busy check) asks a `ServerApi` for `/props`,
`/v1/models`, `/slots`, `/metrics` and `/completion`. `ModelClient` sends each of them for its
model only, in the one form that can never load or swap in a model (docs/multi-model.md):

* router (llama-server b11434): `path?model=X&autoload=false` (`router_path`), and `"model": X`
  in a completion's body. A model that unloaded since the list was read is refused (HTTP 400
  "model is not loaded"), not loaded.
* llama-swap: `/upstream/X/path` (`swap_path`), right after `/running` says X is ready.
  llama-swap has no `autoload=false`: the re-check narrows the window in which X could stop
  and be started again by the request; `upstream.ignorePaths` closes it (docs).

`/v1/models` of a router names no model: it lists every model, and the model's own entry
(with `meta`) is what a child's `/v1/models` would answer.

Every refusal for want of a loaded model becomes `ServerError(NOT_LOADED)`: the round ends
with that reason, and nothing was loaded for it.
"""

from __future__ import annotations

from typing import Any, Literal

from exporter.llama.client import NOT_LOADED, Completion, LlamaClient, ServerError
from exporter.llama.router import (
    is_not_loaded,
    parse_swap_running,
    router_path,
    swap_path,
)

MultiKind = Literal["router", "llama-swap"]


class ModelClient:
    """`model` behind the router or llama-swap that `client` speaks to. Owns no connection:
    the target's client is shared by all its models."""

    def __init__(self, client: LlamaClient, kind: MultiKind, model: str) -> None:
        self._client = client
        self.kind = kind
        self.model = model

    async def get_json(self, path: str) -> Any:
        if self.kind == "router" and path == "/v1/models":
            return await self._router_entry()
        return await self._scoped(self._client.get_json, path)

    async def get_text(self, path: str) -> str:
        text: str = await self._scoped(self._client.get_text, path)
        return text

    async def complete(self, body: dict[str, Any], timeout: float) -> Completion:
        await self._check_running()
        try:
            return await self._client.complete(self._body(body), timeout, self._path("/completion"))
        except ServerError as exc:
            raise _translated(exc) from None

    async def complete_whole(self, body: dict[str, Any], timeout: float) -> Any:
        await self._check_running()
        try:
            return await self._client.complete_whole(
                self._body(body), timeout, self._path("/completion")
            )
        except ServerError as exc:
            raise _translated(exc) from None

    async def _scoped(self, get: Any, path: str) -> Any:
        await self._check_running()
        try:
            return await get(self._path(path))
        except ServerError as exc:
            raise _translated(exc) from None

    def _path(self, path: str) -> str:
        if self.kind == "router":
            return router_path(path, self.model)
        return swap_path(path, self.model)

    def _body(self, body: dict[str, Any]) -> dict[str, Any]:
        # The router routes a POST by the body's `model`; its query's `autoload=false` is what
        # stops it loading one (the body's `autoload` is ignored). llama-swap's /upstream/
        # passes the body to the model's own server, which ignores the field.
        return {**body, "model": self.model} if self.kind == "router" else body

    async def _check_running(self) -> None:
        """llama-swap: refuse here, before `/upstream/X/...` would start X."""
        if self.kind != "llama-swap":
            return
        running = parse_swap_running(await self._client.get_json("/running"))
        if not any(m.name == self.model and m.loaded for m in running):
            raise ServerError(NOT_LOADED, f"model {self.model} is not running (llama-swap)")

    async def _router_entry(self) -> dict[str, Any]:
        listing = await self._client.get_json("/v1/models")
        entries = listing.get("data") if isinstance(listing, dict) else None
        for entry in entries if isinstance(entries, list) else []:
            if isinstance(entry, dict) and entry.get("id") == self.model:
                status = entry.get("status")
                if isinstance(status, dict) and status.get("value") != "loaded":
                    raise ServerError(NOT_LOADED, f"model {self.model} is not loaded (router)")
                return {"data": [entry], "object": "list"}
        raise ServerError(NOT_LOADED, f"model {self.model} is no longer listed (router)")


def _translated(exc: ServerError) -> ServerError:
    if is_not_loaded(exc):
        return ServerError(NOT_LOADED, exc.detail)
    return exc
