"""A fake llama-server at the HTTP transport layer, built from responses recorded from b11434.

It keeps a slot's tokens like the real server, so `cache_n` and `prompt_n` follow the request
(`cache_prompt`, the longest common prefix with the slot), and it can be switched into each
way a real server fails: absent, loading, hanging, erroring, malformed, busy, key-protected.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

FIXTURES = Path(__file__).parent / "fixtures" / "llama"


@functools.cache
def fixture_text(name: str) -> str:
    # Read once: a simulation asks for /props thousands of times.
    return (FIXTURES / name).read_text()


def fixture_json(name: str) -> Any:
    return json.loads(fixture_text(name))


def final_chunk_template() -> dict[str, Any]:
    lines = fixture_text("stream_tg.txt").splitlines()
    chunks = [json.loads(line[5:]) for line in lines if line.startswith("data:")]
    return next(c for c in chunks if c["stop"])


@dataclass
class FakeLlama:
    model_path: str = "/models/Tiny-Model.Q8_0.gguf"
    n_ctx: int = 4096
    slots: int = 4
    n_vocab: int = 314
    api_key: str | None = None
    slots_endpoint: bool = True
    metrics_endpoint: bool = False
    prompt_tps: float = 10000.0
    gen_tps: float = 2000.0
    mode: str = "ok"  # ok | absent | loading | hang | error | malformed
    busy_slots: set[int] = field(default_factory=set)
    sleeping: bool = False
    # Called before each completion answers: lets a test start "production" mid-probe.
    on_completion: Callable[[dict[str, Any]], None] | None = None
    # Override the timings the server reports (to test validation).
    tamper: Callable[[dict[str, Any]], None] | None = None
    # The output canary's answer (a whole, non-streamed completion): the recorded one with
    # each token id shifted by `canary_variant` (another output), then `canary_tamper`.
    canary_variant: int = 0
    canary_tamper: Callable[[dict[str, Any]], None] | None = None
    requests: list[tuple[str, Any]] = field(default_factory=list)
    slot_tokens: dict[int, list[int]] = field(default_factory=dict)
    hang_event: asyncio.Event | None = None

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    async def handle(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        self.requests.append((request.url.path, body))
        if self.mode == "absent":
            raise httpx.ConnectError("connection refused", request=request)
        if self.mode == "hang":
            await asyncio.Event().wait()
        if self.mode == "loading":
            return self._error(503, "Loading model", "unavailable_error")
        if self.api_key is not None and request.url.path != "/health":
            given = request.headers.get("authorization", "").removeprefix("Bearer ")
            if given != self.api_key:
                return self._error(401, "Invalid API Key", "authentication_error")
        if self.mode == "error":
            return self._error(500, "something broke", "server_error")
        if self.mode == "malformed":
            return httpx.Response(200, content=b"{not json", headers={"content-type": "text"})
        route = {
            "/props": self._props,
            "/v1/models": self._models,
            "/slots": self._slots,
            "/metrics": self._metrics,
            "/completion": self._completion,
        }.get(request.url.path)
        if route is None:
            return self._error(404, "File Not Found", "not_found_error")
        return route(body)

    @staticmethod
    def _error(code: int, message: str, kind: str) -> httpx.Response:
        return httpx.Response(
            code, json={"error": {"code": code, "message": message, "type": kind}}
        )

    def _props(self, _: Any) -> httpx.Response:
        props = fixture_json("props.json")
        props["default_generation_settings"]["n_ctx"] = self.n_ctx
        props["total_slots"] = self.slots
        props["model_alias"] = props["model_path"] = self.model_path
        props["endpoint_slots"] = self.slots_endpoint
        props["endpoint_metrics"] = self.metrics_endpoint
        props["is_sleeping"] = self.sleeping
        return httpx.Response(200, json=props)

    def _models(self, _: Any) -> httpx.Response:
        models = fixture_json("models.json")
        entry = models["data"][0]
        entry["id"] = self.model_path
        entry["meta"].update(n_ctx=self.n_ctx, n_vocab=self.n_vocab)
        return httpx.Response(200, json=models)

    def _slots(self, _: Any) -> httpx.Response:
        if not self.slots_endpoint:
            return self._error(
                501, "This server does not support slots endpoint.", "not_supported_error"
            )
        idle = fixture_json("slots_idle.json")[0]
        return httpx.Response(
            200,
            json=[
                {**idle, "id": i, "n_ctx": self.n_ctx, "is_processing": i in self.busy_slots}
                for i in range(self.slots)
            ],
        )

    def _metrics(self, _: Any) -> httpx.Response:
        if not self.metrics_endpoint:
            return self._error(
                501, "This server does not support metrics endpoint.", "not_supported_error"
            )
        text = fixture_text("metrics.txt")
        text = re.sub(
            r"(?m)^llamacpp:requests_processing .*$",
            f"llamacpp:requests_processing {len(self.busy_slots)}",
            text,
        )
        return httpx.Response(200, text=text)

    def _completion(self, body: Any) -> httpx.Response:
        prompt: list[int] = body["prompt"]
        if any(not 0 <= t < self.n_vocab for t in prompt):
            return self._error(400, "Prompt contains invalid tokens", "invalid_request_error")
        if len(prompt) >= self.n_ctx:
            return self._error(400, "exceeds the available context", "exceed_context_size_error")
        if self.on_completion is not None:
            self.on_completion(body)
        slot = body.get("id_slot", -1)
        slot = 0 if slot < 0 else slot
        held = self.slot_tokens.get(slot, [])
        cached = 0
        if body.get("cache_prompt", True):
            while cached < min(len(held), len(prompt)) and held[cached] == prompt[cached]:
                cached += 1
            cached = min(cached, len(prompt) - 1)  # the last token is always re-evaluated
        n_predict = int(body["n_predict"])
        # Like llama-server: the last generated token is sampled but never decoded into the slot.
        self.slot_tokens[slot] = list(prompt) + [self.n_vocab - 1] * max(n_predict - 1, 0)
        prompt_n = len(prompt) - cached
        timings = {
            "cache_n": cached,
            "prompt_n": prompt_n,
            "prompt_ms": prompt_n / self.prompt_tps * 1000,
            "predicted_n": n_predict,
            "predicted_ms": max(n_predict - 1, 0) / self.gen_tps * 1000 or 0.001,
        }
        if self.tamper is not None:
            self.tamper(timings)
        if body.get("stream") is False:
            return self._whole_answer(timings)
        final = copy.deepcopy(final_chunk_template())
        final.update(id_slot=slot, tokens_predicted=n_predict, timings=timings)
        token = {
            "index": 0, "content": "9", "tokens": [self.n_vocab - 1], "stop": False, "id_slot": -1,
        }  # fmt: skip
        events = [token] * n_predict + [final]
        text = "".join(f"data: {json.dumps(e)}\n\n" for e in events)
        return httpx.Response(200, text=text, headers={"content-type": "text/event-stream"})

    def _whole_answer(self, timings: dict[str, Any]) -> httpx.Response:
        answer = fixture_json("completion_canary.json")
        answer["timings"].update(timings)

        def shifted(token: int) -> int:
            return (token + self.canary_variant) % self.n_vocab

        answer["tokens"] = [shifted(t) for t in answer["tokens"]]
        for entry in answer["completion_probabilities"]:
            entry["id"] = shifted(entry["id"])
            entry["top_logprobs"][0]["id"] = entry["id"]
        if self.canary_tamper is not None:
            self.canary_tamper(answer)
        return httpx.Response(200, json=answer)
