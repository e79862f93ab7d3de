"""The probe round against a fake llama-server: requests, validation, busyness, failures."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Coroutine
from typing import Any, TypeVar

import httpx
import pytest

from exporter.llama.client import LlamaClient
from exporter.llama.secret import Secret
from exporter.probe.plan import MeasurePlan
from exporter.probe.results import RoundResult
from exporter.probe.runner import ProbeRunner
from exporter.schedule.budget import DutyBudget
from exporter.schedule.rounds import BudgetedRounds
from tests.fakes import FakeLlama

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def plan(**changes: Any) -> MeasurePlan:
    # The canary's own request is tests/test_canary.py's: these count the measuring ones.
    base = {
        "prompt_tokens": 64, "generation_tokens": 16, "warmup": False, "repetitions": 1,
        "canary": False,
    }  # fmt: skip
    return MeasurePlan(**{**base, **changes})


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def one_round(fake: FakeLlama, p: MeasurePlan | None = None, **kw: Any) -> RoundResult:
    client = LlamaClient("http://llama", transport=fake.transport())
    runner = ProbeRunner("t", client, p or plan(), rng=random.Random(1), **kw)
    try:
        return await runner.run_round()
    finally:
        await client.aclose()


def completions(fake: FakeLlama) -> list[dict[str, Any]]:
    return [body for path, body in fake.requests if path == "/completion"]


def test_pp_and_tg_requests_are_fresh_pinned_and_exact() -> None:
    fake = FakeLlama()
    result = run(one_round(fake))
    pp, tg = completions(fake)
    assert len(pp["prompt"]) == 64 and pp["n_predict"] == 1 and pp["cache_prompt"] is False
    assert len(tg["prompt"]) == 1 and tg["n_predict"] == 16 and tg["ignore_eos"] is True
    assert pp["id_slot"] == tg["id_slot"] == 3  # the highest-numbered of 4 slots
    assert all(0 <= t < fake.n_vocab for t in pp["prompt"])
    assert pp["stream"] is True
    (prompt,) = [s for s in result.samples if s.kind == "prompt"]
    (gen,) = [s for s in result.samples if s.kind == "generation"]
    assert prompt.timings.cache_n == 0 and prompt.tokens == 64
    assert prompt.tokens_per_second == pytest.approx(10000)
    assert gen.tokens == 15 and gen.tokens_per_second == pytest.approx(2000)
    assert (
        prompt.time_to_first_token_seconds is not None and prompt.time_to_first_token_seconds >= 0
    )
    assert all(o.succeeded for o in result.outcomes.values())
    assert result.server is not None and result.server.model == "Tiny-Model.Q8_0"


def test_warmup_request_comes_first_and_is_not_measured() -> None:
    fake = FakeLlama()
    result = run(one_round(fake, plan(warmup=True)))
    warm, pp, _tg = completions(fake)
    assert len(warm["prompt"]) == 64 and warm["n_predict"] == 2 and warm["cache_prompt"] is False
    assert warm["prompt"] != pp["prompt"]
    assert len(result.samples) == 2


def test_fresh_tokens_differ_between_rounds() -> None:
    fake = FakeLlama()

    async def two() -> None:
        client = LlamaClient("http://llama", transport=fake.transport())
        runner = ProbeRunner("t", client, plan())
        await runner.run_round()
        await runner.run_round()

    run(two())
    first, second = completions(fake)[0]["prompt"], completions(fake)[2]["prompt"]
    assert first != second


def test_depth_fills_once_then_measures_only_new_tokens() -> None:
    fake = FakeLlama()
    result = run(one_round(fake, plan(depths=(0, 1024), repetitions=2)))
    bodies = completions(fake)
    # depth 0: PP, TG, PP, TG; depth 1024: fill, then PP, TG twice.
    assert len(bodies) == 9
    fill = bodies[4]
    assert len(fill["prompt"]) == 1024 and fill["cache_prompt"] is False
    for body in bodies[5:]:
        assert body["prompt"][:1024] == fill["prompt"] and body["cache_prompt"] is True
    deep = [s for s in result.samples if s.depth == 1024]
    assert len(deep) == 4
    for s in deep:
        assert s.timings.cache_n == 1024
    assert [s.timings.prompt_n for s in deep if s.kind == "prompt"] == [64, 64]


def test_fresh_tokens_never_extend_the_cached_prefix_by_chance() -> None:
    # With 3 token ids, a fresh token equal to what the slot holds after the prefix would be
    # common: the server would then reuse it and decode one token fewer than asked.
    fake = FakeLlama(n_vocab=3)
    result = run(one_round(fake, plan(depths=(8,), repetitions=12)))
    assert all(o.failure is None for o in result.outcomes.values())
    assert len(result.samples) == 24


def test_depth_past_context_is_skipped_not_sent() -> None:
    fake = FakeLlama(n_ctx=2048)
    result = run(one_round(fake, plan(depths=(0, 4096))))
    assert result.skips == ("depth_exceeds_context",)
    assert {s.depth for s in result.samples} == {0}
    assert all(len(b["prompt"]) < 2048 for b in completions(fake))


@pytest.mark.parametrize(
    ("field", "value", "reason", "kind"),
    [
        ("cache_n", 7, "cache_n_mismatch", "prompt"),
        ("prompt_n", 3, "prompt_n_mismatch", "prompt"),
        ("predicted_n", 5, "predicted_n_mismatch", "generation"),
    ],
)
def test_sample_the_server_did_not_process_as_asked_is_invalid(
    field: str, value: int, reason: str, kind: str
) -> None:
    def tamper(timings: dict[str, Any]) -> None:
        is_gen = timings["predicted_n"] > 1
        if (kind == "generation") == is_gen:
            timings[field] = value

    result = run(one_round(FakeLlama(tamper=tamper)))
    outcome = result.outcomes[kind]  # type: ignore[index]
    assert outcome.failure == reason
    assert not outcome.samples
    assert not outcome.succeeded


def test_busy_server_is_not_probed() -> None:
    fake = FakeLlama(busy_slots={0})
    result = run(one_round(fake))
    assert result.skips == ("busy",)
    assert completions(fake) == []
    assert result.outcomes == {}


def test_production_arriving_mid_probe_discards_the_sample() -> None:
    fake = FakeLlama()
    fake.on_completion = lambda body: fake.busy_slots.add(1)
    result = run(one_round(fake))
    assert result.outcomes["prompt"].discards == ("overlap",)
    assert result.samples == ()
    assert len(completions(fake)) == 1  # the round stops: production has the server now


def test_production_that_came_and_went_between_polls_ends_the_probe_at_once() -> None:
    """On a loaded machine one poll can take longer than a short production request: the new
    task id in its slot is the evidence, and the probe stops while its own request still runs
    instead of at its end (or at the round's timeout)."""
    fake = FakeLlama()
    production_ran = asyncio.Event()

    async def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/completion":
            production_ran.set()  # slot 0 serves a request from start to end meanwhile
            await asyncio.Event().wait()  # the probe's own request would run on for long
        response = await fake.handle(request)
        if request.url.path != "/slots":
            return response
        slots = response.json()
        for s in slots:
            s["id_task"] = 2 if s["id"] == 0 and production_ran.is_set() else 1
        return httpx.Response(200, json=slots)

    async def go() -> RoundResult:
        client = LlamaClient("http://llama", transport=httpx.MockTransport(handle))
        runner = ProbeRunner("t", client, plan(timeout=5), overlap_poll_interval=0.01)
        try:
            return await runner.run_round()
        finally:
            await client.aclose()

    result = run(go())
    assert result.outcomes["prompt"].discards == ("overlap",)
    assert result.outcomes["prompt"].failure is None and result.samples == ()


def test_sleeping_server_is_not_woken() -> None:
    fake = FakeLlama(sleeping=True)
    result = run(one_round(fake))
    assert result.skips == ("sleeping",)
    assert [p for p, _ in fake.requests] == ["/props", "/v1/models"]


def test_slots_disabled_falls_back_to_metrics() -> None:
    fake = FakeLlama(slots_endpoint=False, metrics_endpoint=True, busy_slots={2})
    result = run(one_round(fake))
    assert result.skips == ("busy",)
    assert [p for p, _ in fake.requests].count("/metrics") == 1


def test_no_way_to_see_busyness_skips_unless_allowed() -> None:
    fake = FakeLlama(slots_endpoint=False, metrics_endpoint=False)
    assert run(one_round(fake)).skips == ("busy_unknown",)
    blind = run(one_round(fake, plan(require_busy_check=False)))
    assert all(o.succeeded for o in blind.outcomes.values())


def test_duty_budget_skips_rounds_past_the_share() -> None:
    fake = FakeLlama()
    clock = Clock()

    async def rounds() -> list[RoundResult]:
        client = LlamaClient("http://llama", transport=fake.transport())
        runner = ProbeRunner("t", client, plan(), clock=clock)
        scheduled = BudgetedRounds("t", runner.run_round, DutyBudget(0.02, 3600, clock))
        results = []
        # Each round "takes" 30 s of the fake clock; 2% of an hour is 72 s. A round runs only
        # if the time already spent plus what the last round took still fits.
        original = runner._client.complete

        async def slow(body: dict[str, Any], timeout: float) -> Any:
            clock.now += 15
            return await original(body, timeout)

        runner._client.complete = slow  # type: ignore[method-assign]
        for _ in range(3):
            results.append(await scheduled.next())
            clock.now += 600
        clock.now += 3600  # the window slides past the old rounds
        results.append(await scheduled.next())
        return results

    first, second, third, later = run(rounds())
    assert first.skips == () and second.skips == ()
    assert third.skips == ("duty_budget",) and not third.outcomes
    assert later.skips == ()


def test_slot_out_of_range_fails_with_reason() -> None:
    result = run(one_round(FakeLlama(slots=2), plan(slot=5)))
    assert {o.failure for o in result.outcomes.values()} == {"slot_out_of_range"}


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("absent", "connect"),
        ("loading", "loading"),
        ("error", "http_error"),
        ("malformed", "bad_response"),
    ],
)
def test_server_failures_have_reasons(mode: str, reason: str) -> None:
    result = run(one_round(FakeLlama(mode=mode)))
    assert result.server is None
    assert result.server_error == reason
    assert {k: o.failure for k, o in result.outcomes.items()} == {
        "prompt": reason,
        "generation": reason,
    }
    assert result.detail


def test_hung_server_costs_at_most_the_timeout() -> None:
    fake = FakeLlama(mode="hang")
    loop_time: list[float] = []

    async def timed() -> RoundResult:
        loop = asyncio.get_running_loop()
        start = loop.time()
        result = await one_round(fake, plan(timeout=0.3))
        loop_time.append(loop.time() - start)
        return result

    result = run(timed())
    assert result.server_error == "timeout"
    assert loop_time[0] < 2.0


def test_missing_api_key_is_reported_as_unauthorized() -> None:
    fake = FakeLlama(api_key="sekrit")
    result = run(one_round(fake))
    assert result.server_error == "unauthorized"
    assert "sekrit" not in result.detail


def test_api_key_is_sent_as_bearer() -> None:
    fake = FakeLlama(api_key="sekrit")

    async def go() -> RoundResult:
        client = LlamaClient("http://llama", Secret("sekrit"), transport=fake.transport())
        try:
            return await ProbeRunner("t", client, plan()).run_round()
        finally:
            await client.aclose()

    assert all(o.succeeded for o in run(go()).outcomes.values())


def test_a_busy_skip_does_not_lower_what_the_next_round_is_expected_to_cost() -> None:
    fake = FakeLlama()
    clock = Clock()

    async def rounds() -> list[RoundResult]:
        client = LlamaClient("http://llama", transport=fake.transport())
        runner = ProbeRunner("t", client, plan(), clock=clock)
        # 60.5 s of the hour: a 30 s round, then a 1 s busy skip, leave 29.5 s, too little
        # for another 30 s round, but enough for the 1 s the skip took.
        budget = DutyBudget(60.5 / 3600, 3600, clock)
        scheduled = BudgetedRounds("t", runner.run_round, budget)
        original_complete, original_read = runner._client.complete, runner._activity.read

        async def slow(body: dict[str, Any], timeout: float) -> Any:
            clock.now += 15
            return await original_complete(body, timeout)

        async def slow_read(metrics_enabled: bool) -> Any:
            clock.now += 1 if fake.busy_slots else 0
            return await original_read(metrics_enabled)

        runner._client.complete = slow  # type: ignore[method-assign]
        runner._activity.read = slow_read  # type: ignore[method-assign]
        results = [await scheduled.next()]
        fake.busy_slots.add(0)
        results.append(await scheduled.next())
        fake.busy_slots.clear()
        results.append(await scheduled.next())
        return results

    measured, busy, next_round = run(rounds())
    assert measured.skips == () and busy.skips == ("busy",)
    assert next_round.skips == ("duty_budget",)
