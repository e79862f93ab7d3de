"""Several models behind one endpoint, in the daemon, against a fake b11434 router.

What matters most: no request the exporter sends ever loads a model (`FakeRouter.loads`
stays empty, every request naming a model carries `autoload=false`), loaded models are
probed and labelled, unloaded ones are counted as `not_loaded` skips, and the series of a
model that unloads leave /metrics.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import httpx
import pytest
from prometheus_client import generate_latest

from exporter.config import Config, Target
from exporter.config.resolved import ModelPlan, ModelRules
from exporter.daemon import Daemon
from exporter.llama.client import NOT_LOADED, LlamaClient, ServerError
from exporter.llama.scoped import ModelClient
from exporter.probe.plan import MeasurePlan
from exporter.probe.results import SKIP_BUSY, SKIP_NOT_LOADED
from exporter.web.endpoint import landing_page
from tests.daemon_harness import fast_target, sample
from tests.fake_router import FakeRouter

T = TypeVar("T")
ROUNDS = 20


def router_target(**changes: Any) -> Target:
    target = fast_target("r", "http://router", **changes)
    return Target(
        target.name, target.url, plan=target.plan, schedule=target.schedule,
        mode=changes.get("mode", "auto"), models=changes.get("models", ModelRules()),
    )  # fmt: skip


def with_daemon(
    fake: FakeRouter, target: Target, use: Callable[[Daemon], Awaitable[T]]
) -> tuple[Daemon, T]:
    config = Config((target,), "127.0.0.1:0", "/metrics", "console", "warning", gpu=False)
    daemon = Daemon(config, transport_factory=lambda _: fake.transport())

    async def go() -> T:
        try:
            return await use(daemon)
        finally:
            for rt in daemon._runtimes.values():
                await rt.client.aclose()

    try:
        return daemon, asyncio.run(go())
    finally:
        daemon.web.start()  # close() waits for a serve loop, so there must be one
        daemon.web.close()


async def rounds(daemon: Daemon, count: int) -> None:
    for _ in range(count):
        await daemon.discover("r")
        await daemon.probe("r")


def metrics(daemon: Daemon) -> str:
    return generate_latest(daemon.registry).decode()


def assert_never_loads(fake: FakeRouter) -> None:
    assert fake.loads == []
    for path, query, body in fake.requests:
        named = query.get("model") or (body or {}).get("model")
        if named is not None:
            assert query.get("autoload") == "false", (path, query)


def test_only_the_loaded_model_is_probed_and_nothing_is_ever_loaded() -> None:
    fake = FakeRouter.of("alpha", "beta", loaded=("alpha",), max_instances=1)
    daemon, _ = with_daemon(fake, router_target(), lambda d: rounds(d, ROUNDS))
    assert_never_loads(fake)
    assert fake.named() == {"alpha"}
    assert fake.loaded == ["alpha"]
    text = metrics(daemon)
    assert sample(text, "llama_speed_model_loaded", target="r", model="alpha") == 1.0
    assert sample(text, "llama_speed_model_loaded", target="r", model="beta") == 0.0
    alpha = {"target": "r", "model": "alpha", "ctx": "4096", "depth": "0"}
    assert sample(text, "llama_speed_generation_tokens_per_second", **alpha) == pytest.approx(2000)
    assert sample(text, "llama_speed_generation_tokens_per_second", model="beta") is None
    skipped = sample(text, "llama_speed_probes_skipped_total", target="r", reason="not_loaded")
    assert skipped == ROUNDS
    assert sample(text, "llama_speed_server_up", target="r") == 1.0
    assert sample(text, "llama_speed_server_info", target="r", model="alpha") == 1.0


def test_both_models_are_labelled_and_an_unloaded_ones_series_go() -> None:
    fake = FakeRouter.of("alpha", "beta", loaded=("alpha", "beta"))

    async def scenario(daemon: Daemon) -> tuple[str, str]:
        await rounds(daemon, 1)
        both = metrics(daemon)
        fake.unload("beta")
        await rounds(daemon, 1)
        return both, metrics(daemon)

    daemon, (both, after) = with_daemon(fake, router_target(), scenario)
    assert_never_loads(fake)
    for model in ("alpha", "beta"):
        labels = {"target": "r", "model": model, "depth": "0"}
        assert sample(both, "llama_speed_prompt_tokens_per_second", **labels) is not None
        assert sample(both, "llama_speed_canary_info", target="r", model=model) == 1.0
    assert sample(after, "llama_speed_prompt_tokens_per_second", model="alpha") is not None
    for name in (
        "llama_speed_prompt_tokens_per_second", "llama_speed_server_info",
        "llama_speed_canary_info", "llama_speed_model_parameters",
    ):  # fmt: skip
        assert sample(after, name, model="beta") is None, name
    assert sample(after, "llama_speed_model_loaded", target="r", model="beta") == 0.0
    page = landing_page(daemon.store.snapshot(), "/metrics", 0.0)
    assert "alpha" in page and "beta" in page and "not loaded" in page


def test_production_on_one_model_makes_the_others_round_skip() -> None:
    fake = FakeRouter.of("alpha", "beta", loaded=("alpha", "beta"))
    fake.models["alpha"].busy_slots = {0}

    async def scenario(daemon: Daemon) -> None:
        await rounds(daemon, 3)

    daemon, _ = with_daemon(fake, router_target(), scenario)
    assert_never_loads(fake)
    completions = [q.get("model") for p, q, _ in fake.requests if p == "/completion"]
    assert completions == []
    text = metrics(daemon)
    assert sample(text, "llama_speed_probes_skipped_total", target="r", reason=SKIP_BUSY) == 6


def test_a_model_loading_counts_as_busy() -> None:
    fake = FakeRouter.of("alpha", "beta", loaded=("alpha",))
    fake.loading.add("beta")
    daemon, _ = with_daemon(fake, router_target(), lambda d: rounds(d, 1))
    assert_never_loads(fake)
    text = metrics(daemon)
    assert sample(text, "llama_speed_probes_skipped_total", target="r", reason=SKIP_BUSY) == 1


def test_production_arriving_on_another_model_mid_probe_discards_the_sample() -> None:
    fake = FakeRouter.of("alpha", "beta", loaded=("alpha", "beta"))
    beta = fake.models["beta"]
    fake.models["alpha"].on_completion = lambda body: beta.busy_slots.add(0)

    daemon, _ = with_daemon(fake, router_target(), lambda d: rounds(d, 1))
    text = metrics(daemon)
    discarded = sample(text, "llama_speed_probes_discarded_total", target="r", reason="overlap")
    assert discarded is not None and discarded >= 1


def test_a_model_that_unloads_mid_round_ends_it_as_not_loaded_and_is_not_loaded_again() -> None:
    fake = FakeRouter.of("alpha", "beta", loaded=("alpha",), max_instances=1)
    fake.models["alpha"].on_completion = lambda body: fake.loaded.clear()

    async def scenario(daemon: Daemon) -> None:
        await daemon.discover("r")
        result = await daemon.probe("r")
        assert result is not None and SKIP_NOT_LOADED in result.skips
        assert not any(o.failure for o in result.outcomes.values())

    daemon, _ = with_daemon(fake, router_target(), scenario)
    assert_never_loads(fake)
    assert fake.loaded == []
    text = metrics(daemon)
    assert sample(text, "llama_speed_prompt_tokens_per_second", model="alpha") is None


def test_include_exclude_and_a_per_model_plan() -> None:
    fake = FakeRouter.of("alpha", "beta", "gamma-draft", loaded=("alpha", "beta", "gamma-draft"))
    deep = MeasurePlan(timeout=0.8, prompt_tokens=64, generation_tokens=16, depths=(0, 256))
    rules = ModelRules(
        exclude=("*-draft",), plans=(ModelPlan("alpha", deep), ModelPlan("b*", None))
    )
    daemon, _ = with_daemon(fake, router_target(models=rules), lambda d: rounds(d, 1))
    # An excluded model is neither listed nor probed; only its /slots are read, for the busy
    # check: it shares the GPUs all the same.
    asked = {p for p, q, _ in fake.requests if q.get("model") == "gamma-draft"}
    assert asked == {"/slots"}
    text = metrics(daemon)
    assert sample(text, "llama_speed_model_loaded", model="gamma-draft") is None
    assert sample(text, "llama_speed_model_loaded", target="r", model="beta") == 1.0
    assert sample(text, "llama_speed_prompt_tokens_per_second", model="alpha", depth="256")
    assert sample(text, "llama_speed_prompt_tokens_per_second", model="beta") is None
    assert not [q for p, q, _ in fake.requests if p == "/completion" and q["model"] == "beta"]


def test_a_configured_mode_is_not_detected() -> None:
    fake = FakeRouter.of("alpha", "beta", loaded=("beta",), max_instances=1)
    with_daemon(fake, router_target(mode="router"), lambda d: rounds(d, 2))
    assert_never_loads(fake)
    assert not [p for p, q, _ in fake.requests if p == "/props" and "model" not in q]


def test_llama_swap_client_rechecks_running_and_never_reaches_upstream() -> None:
    seen: list[str] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        if request.url.path == "/running":
            running = [{"model": "beta", "state": "ready", "cmd": "", "proxy": "", "ttl": 0}]
            return httpx.Response(200, json={"running": running})
        return httpx.Response(200, json={})

    async def go() -> ServerError:
        client = LlamaClient("http://swap", transport=httpx.MockTransport(handle))
        try:
            with pytest.raises(ServerError) as caught:
                await ModelClient(client, "llama-swap", "alpha").get_json("/slots")
            await ModelClient(client, "llama-swap", "beta").get_json("/slots")
            return caught.value
        finally:
            await client.aclose()

    error = asyncio.run(go())
    assert error.reason == NOT_LOADED
    assert seen == ["/running", "/running", "/upstream/beta/slots"]
