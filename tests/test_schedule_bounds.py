"""Every numeric setting has an upper bound, and the scheduler runs with each at its maximum."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from exporter.config import ConfigError
from exporter.config.settings import load_config
from exporter.declared import SettingError
from exporter.probe.plan import (
    MAX_DEPTH,
    MAX_REPETITIONS,
    MAX_TIMEOUT_SECONDS,
    MAX_TOKENS,
    MeasurePlan,
)
from exporter.schedule.plan import (
    MAX_DISCOVERY_INTERVAL_SECONDS,
    MAX_INTERVAL_SECONDS,
    MAX_JITTER_SECONDS,
    Schedule,
)
from exporter.schedule.scheduler import Scheduler

# Generous against a loaded machine: the job is due at once.
FIRST_RUN_S = 10.0

MAXIMA: dict[str, Any] = {
    "interval": MAX_INTERVAL_SECONDS,
    "jitter": MAX_JITTER_SECONDS,
    "discovery_interval": MAX_DISCOVERY_INTERVAL_SECONDS,
    "timeout": MAX_TIMEOUT_SECONDS,
    "prompt_tokens": MAX_TOKENS,
    "generation_tokens": MAX_TOKENS,
    "depths": (0, MAX_DEPTH),
    "repetitions": MAX_REPETITIONS,
}


def test_the_maxima_are_accepted_together() -> None:
    (target,) = load_config({"probe": MAXIMA}, None).targets
    assert target.plan.depths == (0, MAX_DEPTH) and target.plan.repetitions == MAX_REPETITIONS
    assert target.schedule.interval == MAX_INTERVAL_SECONDS
    assert target.schedule.jitter == MAX_JITTER_SECONDS


@pytest.mark.parametrize(
    ("field", "value"),
    [("interval", 1e15), ("interval", MAX_INTERVAL_SECONDS + 1), ("jitter", 1e15),
     ("discovery_interval", 1e15), ("timeout", 1e15), ("prompt_tokens", MAX_TOKENS + 1),
     ("generation_tokens", MAX_TOKENS + 1), ("depths", (0, MAX_DEPTH + 1)),
     ("repetitions", MAX_REPETITIONS + 1)],
)  # fmt: skip
def test_past_a_maximum_is_a_config_error(field: str, value: Any) -> None:
    model = Schedule if field in Schedule.field_names() else MeasurePlan
    with pytest.raises(SettingError, match="less than or equal"):
        model(**{field: value})
    with pytest.raises(ConfigError, match=f"probe.{field}"):
        load_config({"probe": {field: value}}, None)


def test_the_scheduler_runs_a_job_at_the_longest_interval_and_jitter() -> None:
    """APScheduler adds interval and jitter to datetimes: at the maxima that must neither
    overflow when the job is added nor when its next run is worked out after a run."""

    async def main() -> None:
        ran = asyncio.Event()

        async def job(arg: str) -> None:
            ran.set()

        scheduler = Scheduler(asyncio.get_running_loop(), on_max_instances=lambda name: None)
        scheduler.add("probe:t", job, "t", interval=MAX_INTERVAL_SECONDS,
                      jitter=MAX_JITTER_SECONDS, first_delay=0.0)  # fmt: skip
        scheduler.add("discover:t", job, "t", interval=MAX_DISCOVERY_INTERVAL_SECONDS,
                      jitter=0.0, first_delay=MAX_INTERVAL_SECONDS)  # fmt: skip
        scheduler.start()
        try:
            await asyncio.wait_for(ran.wait(), FIRST_RUN_S)
            after = scheduler.next_run("probe:t")
            now = datetime.now(UTC)
            assert after is not None
            interval = timedelta(seconds=MAX_INTERVAL_SECONDS)
            jitter = timedelta(seconds=MAX_JITTER_SECONDS)
            assert now + interval - timedelta(minutes=1) < after < now + interval + jitter
            assert scheduler.next_run("discover:t") is not None
        finally:
            assert await scheduler.shutdown(1.0) == []

    asyncio.run(main())
