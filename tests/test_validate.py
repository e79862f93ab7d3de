"""A sample's timings against the exporter's own clock: impossible figures never count."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest

from exporter.llama.client import Completion, LlamaClient, Timings
from exporter.probe.runner import ProbeRunner
from exporter.probe.validate import timing_problem
from tests.fakes import FakeLlama
from tests.test_runner import one_round, plan, run


def done(
    prompt_ms: float = 100.0,
    predicted_ms: float = 300.0,
    first: float = 0.11,
    total: float = 0.42,
) -> Completion:
    return Completion(Timings(4, prompt_ms, 0, 16, predicted_ms), first, total)


def test_honest_timings_pass() -> None:
    assert timing_problem("prompt", done()) is None
    assert timing_problem("generation", done()) is None


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, -1.0])
def test_non_finite_or_negative_durations_are_invalid(bad: float) -> None:
    for kind, changes in (("prompt", {"prompt_ms": bad}), ("generation", {"predicted_ms": bad})):
        problem = timing_problem(kind, done(**changes))  # type: ignore[arg-type]
        assert problem is not None and problem[0] == "invalid_timings"


def test_zero_time_for_the_measured_kind_is_invalid() -> None:
    assert timing_problem("prompt", done(prompt_ms=0))[0] == "invalid_timings"  # type: ignore[index]
    assert timing_problem("generation", done(predicted_ms=0))[0] == "invalid_timings"  # type: ignore[index]
    # The kind not measured may take no time: a PP request generates a single token.
    assert timing_problem("prompt", done(predicted_ms=0)) is None


def test_more_server_time_than_the_request_took_is_inconsistent() -> None:
    problem = timing_problem("generation", done(predicted_ms=900, total=0.5, first=0.1))
    assert problem is not None and problem[0] == "inconsistent_timings"


def test_a_claim_far_faster_than_what_the_exporter_saw_is_inconsistent() -> None:
    # 512 tokens that took 0.55 s to the first token, claimed as 34 ms: 15x the real speed.
    problem = timing_problem("prompt", done(prompt_ms=34, first=0.55, total=0.9))
    assert problem is not None and problem[0] == "inconsistent_timings"
    # 128 steps streamed over 2.5 s, claimed as 170 ms.
    problem = timing_problem("generation", done(predicted_ms=170, first=0.1, total=2.6))
    assert problem is not None and problem[0] == "inconsistent_timings"


def test_overhead_on_a_short_request_is_allowed() -> None:
    # HTTP and thread hand-offs add a fixed cost the server does not count.
    short = done(prompt_ms=5, predicted_ms=1, first=0.2, total=0.21)
    assert timing_problem("prompt", short) is None


def test_one_bad_repetition_keeps_every_figure_of_its_kind_out_of_the_round() -> None:
    seen: dict[str, int] = {"prompt": 0}

    def tamper(timings: dict[str, Any]) -> None:
        if timings["predicted_n"] == 1:  # a PP request
            seen["prompt"] += 1
            if seen["prompt"] == 2:
                timings["prompt_ms"] = math.nan

    result = run(one_round(FakeLlama(tamper=tamper), plan(repetitions=3)))
    prompt = result.outcomes["prompt"]
    assert prompt.failure == "invalid_timings"
    assert len(prompt.samples) == 2  # the good ones are kept for the record ...
    assert not [s for s in result.samples if s.kind == "prompt"]  # ... but count for nothing
    assert len([s for s in result.samples if s.kind == "generation"]) == 3


def test_the_runner_checks_timings_against_its_own_clock() -> None:
    class Slow:
        """Each read of the clock is 0.3 s after the last: every request takes 0.6 s."""

        now = 0.0

        def __call__(self) -> float:
            self.now += 0.3
            return self.now

    async def go() -> Any:
        fake = FakeLlama()  # claims a few ms per request
        client = LlamaClient("http://llama", transport=fake.transport(), clock=Slow())
        runner = ProbeRunner("t", client, plan(), rng=random.Random(1))
        try:
            return await runner.run_round()
        finally:
            await client.aclose()

    result = run(go())
    assert {o.failure for o in result.outcomes.values()} == {"inconsistent_timings"}
    assert result.samples == ()
