"""A fake llama-server router (b11434) at the HTTP transport layer, over one `FakeLlama` per
model, built from the answers recorded in tests/fixtures/router/.

It does what makes a router dangerous to monitor: a request that names a model that is not
loaded loads it (evicting the least recently loaded one past `max_instances`), unless its
query says `autoload=false`, which is refused with HTTP 400 "model is not loaded". Every load
a request caused is in `loads`: the exporter's tests expect it to stay empty.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.fakes import FakeLlama

ROUTER_FIXTURES = Path(__file__).parent / "fixtures" / "router"


def router_fixture(name: str) -> Any:
    return json.loads((ROUTER_FIXTURES / name).read_text())


@dataclass
class FakeRouter:
    models: dict[str, FakeLlama]
    loaded: list[str] = field(default_factory=list)  # in load order, for the LRU eviction
    max_instances: int = 2
    loads: list[str] = field(default_factory=list)  # models a request loaded
    loading: set[str] = field(default_factory=set)  # listed as `loading`, serving nothing
    # (path, query, body) of each request, in order.
    requests: list[tuple[str, dict[str, str], Any]] = field(default_factory=list)

    @classmethod
    def of(cls, *names: str, loaded: tuple[str, ...] = (), **kwargs: Any) -> FakeRouter:
        models = {n: FakeLlama(model_path=f"/models/{n}.gguf") for n in names}
        return cls(models, list(loaded), **kwargs)

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def unload(self, name: str) -> None:
        self.loaded.remove(name)

    def load(self, name: str) -> None:
        """An owner's `POST /models/load`: not counted in `loads`."""
        self.loaded.append(name)

    def named(self) -> set[str]:
        """Every model a request named."""
        return {q["model"] for _, q, _ in self.requests if "model" in q} | {
            b["model"] for _, _, b in self.requests if isinstance(b, dict) and "model" in b
        }

    async def handle(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        query = dict(request.url.params)
        path = request.url.path
        self.requests.append((path, query, body))
        if path in ("/models", "/v1/models"):
            return httpx.Response(200, json=self.listing())
        if path == "/health":
            return httpx.Response(200, json={"status": "ok"})
        if path == "/running":
            return httpx.Response(404, text="File Not Found")
        name = query.get("model") or (body or {}).get("model")
        if path == "/props" and name is None:
            props = router_fixture("router_props.json")
            props["max_instances"] = self.max_instances
            return httpx.Response(200, json=props)
        return await self._for_model(request, name, query)

    async def _for_model(
        self, request: httpx.Request, name: str | None, query: dict[str, str]
    ) -> httpx.Response:
        if name is None:
            return _error(400, "model name is missing from the request")
        if name not in self.models:
            return _error(400, f"model '{name}' not found")
        if name not in self.loaded:
            if query.get("autoload", "") not in ("", "true"):
                return _error(400, "model is not loaded")
            self.loads.append(name)
            self.loaded.append(name)
            while len(self.loaded) > self.max_instances:
                self.loaded.pop(0)  # evicts the model production uses
        return await self.models[name].handle(request)

    def listing(self) -> dict[str, Any]:
        template = router_fixture("router_models_one_loaded.json")["data"][0]
        data = []
        for port, (name, fake) in enumerate(sorted(self.models.items()), start=51000):
            entry = copy.deepcopy(template)
            entry["id"] = name
            status = "loading" if name in self.loading else "unloaded"
            status = "loaded" if name in self.loaded else status
            args = entry["status"]["args"]
            args[args.index("--port") + 1] = str(port) if status != "unloaded" else "0"
            args[args.index("--alias") + 1] = name
            args[args.index("--model") + 1] = fake.model_path
            entry["status"]["value"] = status
            if status == "loaded":
                entry["meta"].update(n_ctx=fake.n_ctx, n_vocab=fake.n_vocab)
            else:
                del entry["meta"]
            data.append(entry)
        return {"data": data, "object": "list"}


def _error(code: int, message: str) -> httpx.Response:
    return httpx.Response(
        code, json={"error": {"code": code, "message": message, "type": "invalid_request_error"}}
    )
