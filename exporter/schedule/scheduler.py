"""APScheduler wiring: interval jobs with jitter, one instance at a time, cancellable."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from apscheduler.events import EVENT_JOB_MAX_INSTANCES, JobSubmissionEvent
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.interval import IntervalTrigger


class Scheduler:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        on_max_instances: Callable[[str], None],
    ) -> None:
        self._scheduler = AsyncIOScheduler(event_loop=loop, timezone=UTC)
        self._running: set[asyncio.Task[Any]] = set()
        self._args: dict[str, str] = {}
        self._on_max_instances = on_max_instances
        self._scheduler.add_listener(self._max_instances, EVENT_JOB_MAX_INSTANCES)

    def add(
        self,
        job_id: str,
        func: Callable[[str], Awaitable[Any]],
        arg: str,
        *,
        interval: float,
        jitter: float,
        first_delay: float,
    ) -> None:
        async def tracked() -> None:
            task = asyncio.current_task()
            assert task is not None  # noqa: S101 - always inside a task here
            self._running.add(task)
            try:
                await func(arg)
            except asyncio.CancelledError:
                # Shutdown cancels in-flight jobs on purpose; ending quietly is their success.
                return
            finally:
                self._running.discard(task)

        self._args[job_id] = arg
        self._scheduler.add_job(
            tracked,
            IntervalTrigger(seconds=interval, jitter=jitter or None),
            id=job_id,
            max_instances=1,  # one probe at a time per target
            coalesce=True,  # after a stall, run once, not once per missed interval
            misfire_grace_time=None,
            next_run_time=datetime.now(UTC) + timedelta(seconds=first_delay),
        )

    def _max_instances(self, event: JobSubmissionEvent) -> None:
        if event.job_id.startswith("probe:"):
            self._on_max_instances(self._args[event.job_id])

    def start(self) -> None:
        self._scheduler.start()

    async def shutdown(self, grace: float) -> None:
        """Stop scheduling, cancel running jobs and give them `grace` seconds to unwind."""
        self._scheduler.pause()
        running = set(self._running)
        for task in running:
            task.cancel()
        if running:
            await asyncio.wait(running, timeout=grace)
        self._scheduler.shutdown(wait=False)
