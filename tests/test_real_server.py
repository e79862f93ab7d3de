"""The probes against a real llama-server (b11434) on a generated tiny model."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from exporter.collectors import exporter_collectors
from exporter.llama.client import LlamaClient
from exporter.llama.secret import Secret
from exporter.llama.server_process import free_port
from exporter.probe.plan import MeasurePlan
from exporter.probe.results import RoundResult
from exporter.probe.runner import ProbeRunner
from exporter.schedule.plan import Schedule
from exporter.state.store import Store
from testbed.llama_server import LlamaServerProcess
from testbed.tiny_model import write_tiny_model
from tests.conftest import StartServer
from tests.daemon_harness import fast_target, running_daemon, sample, wait_for_metrics

pytestmark = pytest.mark.real_server
T = TypeVar("T")


def plan(**changes: Any) -> MeasurePlan:
    base = {"prompt_tokens": 256, "generation_tokens": 32, "repetitions": 1}
    return MeasurePlan(**{**base, **changes})


class CapturingTransport(httpx.AsyncBaseTransport):
    """Passes requests to the server and keeps each completion's final chunk, parsed apart
    from the exporter's own parser, so tests compare against what the server said."""

    def __init__(self) -> None:
        self._inner = httpx.AsyncHTTPTransport()
        self.completions: list[tuple[dict[str, Any], dict[str, Any]]] = []
        self.final_fields: list[set[str]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self._inner.handle_async_request(request)
        if request.url.path != "/completion":
            return response
        body = await response.aread()
        events = [
            # Split at LF only: a detokenized random prompt can hold U+2028 or U+0085.
            json.loads(line[5:])
            for line in body.decode().split("\n")
            if line.startswith("data:")
        ]
        finals = [e for e in events if e.get("stop")]
        if finals:
            self.completions.append((json.loads(request.content), finals[-1]["timings"]))
            self.final_fields.append(set(finals[-1]))
        return httpx.Response(
            response.status_code,
            content=body,
            headers={"content-type": response.headers.get("content-type", "")},
        )

    async def aclose(self) -> None:
        await self._inner.aclose()


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


async def probe_round(
    url: str,
    p: MeasurePlan,
    transport: httpx.AsyncBaseTransport | None = None,
    api_key: str | None = None,
    rounds: int = 1,
) -> list[RoundResult]:
    key = Secret(api_key) if api_key else None
    client = LlamaClient(url, key, timeout=p.timeout, transport=transport)
    runner = ProbeRunner("t", client, p, overlap_poll_interval=0.1)
    try:
        return [await runner.run_round() for _ in range(rounds)]
    finally:
        await client.aclose()


def render(results: list[RoundResult], p: MeasurePlan) -> str:
    store = Store([("t", "http://x")])
    for r in results:
        store.record_round(r)
    registry = CollectorRegistry()
    registry.register(exporter_collectors(store.snapshot, {"t": Schedule()}))
    return generate_latest(registry).decode()


def server_counters(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics").text
    values = {}
    for line in text.splitlines():
        if line.startswith("llamacpp:") and " " in line:
            name, _, value = line.partition(" ")
            values[name] = float(value)
    return values


def test_exported_speeds_are_the_servers_timings(llama_server: StartServer) -> None:
    server = llama_server("--metrics")
    p = plan(depths=(0, 1024))
    capture = CapturingTransport()
    (result,) = run(probe_round(server.url, p, capture))
    text = render([result], p)

    assert all(o.succeeded for o in result.outcomes.values()), result
    # A warm-up, 2 depths x (PP + TG), and one fill for depth 1024.
    assert len(capture.completions) == 6
    # The server honours `response_fields`: the final event does not echo the prompt, which
    # at a deep depth would be megabytes against the exporter's size limit.
    assert capture.final_fields == [{"stop", "timings"}] * 6
    for request, timings in capture.completions:
        depth = 1024 if request["cache_prompt"] else 0
        if request["n_predict"] == 2 or len(request["prompt"]) == 1024:
            continue  # the warm-up and the fill are not measured
        labels = {"target": "t", "model": "tiny", "ctx": "4096", "depth": str(depth)}
        if request["n_predict"] == 1:
            # PP: exactly the fresh tokens were decoded, nothing came from a cache.
            assert timings["prompt_n"] == 256
            assert timings["cache_n"] == depth
            exported = sample(text, "llama_speed_prompt_tokens_per_second", **labels)
            assert exported == pytest.approx(timings["prompt_per_second"], rel=1e-9)
        else:
            assert timings["predicted_n"] == 32
            assert timings["cache_n"] == depth
            exported = sample(text, "llama_speed_generation_tokens_per_second", **labels)
            assert exported == pytest.approx(timings["predicted_per_second"], rel=1e-9)
    ttft = sample(text, "llama_speed_time_to_first_token_seconds", depth="0")
    assert ttft is not None and 0 < ttft < 5


def test_counters_agree_with_the_servers_own_counters(llama_server: StartServer) -> None:
    server = llama_server("--metrics", "-c", "8192")
    # The warm-up and the canary are left out: unmeasured by design, the server counts them.
    p = plan(prompt_tokens=4096, generation_tokens=64, warmup=False, canary=False)
    before = server_counters(server.url)
    results = run(probe_round(server.url, p, rounds=3))
    after = server_counters(server.url)
    text = render(results, p)

    def delta(name: str) -> float:
        return after[f"llamacpp:{name}"] - before[f"llamacpp:{name}"]

    ours_pp = sample(text, "llama_speed_probe_prompt_tokens_total") or 0
    ours_pp_s = sample(text, "llama_speed_probe_prompt_seconds_total") or 0
    ours_tg = sample(text, "llama_speed_probe_generated_tokens_total") or 0
    ours_tg_s = sample(text, "llama_speed_probe_generation_seconds_total") or 0
    assert ours_pp == 3 * 4096 and ours_tg == 3 * 63
    # The server's counters are the sums of every request's timings. Beside what the probes
    # measure they hold each TG probe's one-token prompt and each PP probe's one generated
    # token, whose time is noise that grows with the machine's load. Those parts are taken out
    # exactly, from the same timings, so the comparison does not depend on the load.
    pp = [s.timings for r in results for s in r.samples if s.kind == "prompt"]
    tg = [s.timings for r in results for s in r.samples if s.kind == "generation"]
    assert delta("prompt_tokens_total") == ours_pp + sum(t.prompt_n for t in tg)
    assert delta("tokens_predicted_total") == ours_tg + len(tg) + sum(t.predicted_n for t in pp)
    # Generation time the server counts as it reports it, to its microsecond rounding.
    tg_seconds = delta("tokens_predicted_seconds_total") - sum(t.predicted_ms for t in pp) / 1000
    assert ours_tg_s == pytest.approx(tg_seconds, rel=1e-4)
    # Prompt time the server counts a fraction of a millisecond short of what its timings say
    # for each request (its clock stops before the first token is sampled): long prompts keep
    # that far below 1% of the measured time, whatever the load.
    pp_seconds = delta("prompt_seconds_total") - sum(t.prompt_ms for t in tg) / 1000
    assert ours_pp_s == pytest.approx(pp_seconds, rel=1e-2)


def poll(predicate: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


def busy(url: str) -> bool:
    return any(s["is_processing"] for s in httpx.get(f"{url}/slots").json())


def test_long_production_request_makes_the_next_probe_skip(llama_server: StartServer) -> None:
    # Room for a production request of several seconds; it is cut short once the probe ran.
    server = llama_server("-c", "16384")
    stop = threading.Event()
    outcome: list[object] = []

    def production() -> None:
        body = {"prompt": "the llama", "n_predict": 16000, "ignore_eos": True, "stream": True}
        try:
            with httpx.stream("POST", f"{server.url}/completion", json=body, timeout=60) as r:
                outcome.append(r.status_code)
                for _ in r.iter_lines():
                    if stop.is_set():
                        return
        except httpx.HTTPError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=production)
    thread.start()
    try:
        poll(lambda: busy(server.url) or not thread.is_alive())
        assert thread.is_alive(), f"production request ended early: {outcome}"
        (result,) = run(probe_round(server.url, plan()))
    finally:
        stop.set()
        thread.join()
    assert outcome == [200]
    assert result.skips == ("busy",)
    assert result.samples == ()


def generating(slots: httpx.Response) -> bool:
    """The probe's slot (the highest) is in its generation phase."""
    probe_slot = slots.json()[-1]
    steps = probe_slot.get("next_token", [{}])[0].get("n_decoded", 0)
    return bool(probe_slot["is_processing"]) and steps > 8


# Rounds to try before giving up on catching one mid-generation.
CATCH_ATTEMPTS = 5


def test_production_request_during_a_probe_discards_it(llama_server: StartServer) -> None:
    server = llama_server()
    p = plan(generation_tokens=3500)  # long enough to be caught in the act

    async def scenario() -> RoundResult | None:
        """The probe's round, or None where it ended before a poll saw it generating (a
        loaded machine can starve the polls for the whole 3500 tokens)."""
        probe = asyncio.ensure_future(probe_round(server.url, p))
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            while not probe.done():
                if generating(await http.get("/slots")):
                    body = {"prompt": "the", "n_predict": 8, "id_slot": 0}
                    production = await http.post("/completion", json=body)
                    assert production.status_code == 200
                    break
                await asyncio.sleep(0.005)
            else:
                await probe
                return None
        (result,) = await probe
        return result

    for _ in range(CATCH_ATTEMPTS):
        caught = run(scenario())
        if caught is not None:
            break
    assert caught is not None, f"no poll saw the probe generating in {CATCH_ATTEMPTS} rounds"
    result = caught
    assert "overlap" in result.outcomes["generation"].discards
    assert not [s for s in result.samples if s.kind == "generation"]


def test_api_key_protected_server(llama_server: StartServer) -> None:
    server = llama_server("--api-key", "sekrit-key")
    (ok,) = run(probe_round(server.url, plan(), api_key="sekrit-key"))
    assert all(o.succeeded for o in ok.outcomes.values())
    (refused,) = run(probe_round(server.url, plan()))
    assert refused.server_error == "unauthorized"
    assert {o.failure for o in refused.outcomes.values()} == {"unauthorized"}
    (wrong,) = run(probe_round(server.url, plan(), api_key="wrong-key"))
    assert wrong.server_error == "unauthorized"
    assert "wrong-key" not in wrong.detail


def test_daemon_follows_a_restart_with_another_model(
    tiny_model: Path, llama_server_binary: Path, tmp_path: Path
) -> None:
    other = write_tiny_model(tmp_path / "other.gguf", n_layer=2, n_embd=128, n_head=2)
    port = free_port()
    first = LlamaServerProcess(tiny_model, ["-c", "4096"], port=port, binary=llama_server_binary)
    with (
        first,
        running_daemon([fast_target("t", first.url, timeout=1.5, interval=2.0)]) as (
            _,
            base,
        ),
    ):
        wait_for_metrics(
            base, lambda t: sample(t, "llama_speed_probe_success", probe="generation") == 1.0
        )
        first.stop()
        text = wait_for_metrics(base, lambda t: sample(t, "llama_speed_server_up") == 0.0)
        assert 'model="tiny"' in text  # the last figures stay until another server answers
        second = LlamaServerProcess(other, ["-c", "2048"], port=port, binary=llama_server_binary)
        with second:
            text = wait_for_metrics(
                base,
                lambda t: (
                    sample(t, "llama_speed_generation_tokens_per_second", model="other") is not None
                ),
                timeout=30,
            )
        assert 'model="tiny"' not in text
        assert sample(text, "llama_speed_server_info", model="other", ctx="2048") == 1.0
        assert sample(text, "llama_speed_server_up") == 1.0


def test_sleeping_server_is_left_asleep(llama_server: StartServer) -> None:
    server = llama_server("--sleep-idle-seconds", "1")
    poll(lambda: bool(httpx.get(f"{server.url}/props").json().get("is_sleeping")))
    (result,) = run(probe_round(server.url, plan()))
    assert result.skips == ("sleeping",)
    assert httpx.get(f"{server.url}/props").json()["is_sleeping"] is True
