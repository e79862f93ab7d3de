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
        # In-flight jobs, by task: shutdown cancels them; a forced exit names them.
        self._running: dict[asyncio.Task[Any], str] = {}
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
            self._running[task] = job_id
            try:
                await func(arg)
            except asyncio.CancelledError:
                # Shutdown cancels in-flight jobs on purpose; ending quietly is their success.
                return
            finally:
                self._running.pop(task, None)

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

    def running(self) -> list[str]:
        """Ids of the jobs in flight; safe from another thread (a shutdown watchdog): set()
        copies the values in one C loop that holds the GIL, so the dict cannot change midway."""
        return sorted(set(self._running.values()))

    def next_run(self, job_id: str) -> datetime | None:
        """When `job_id` runs next; None once it is removed or the scheduler is shut down."""
        job = self._scheduler.get_job(job_id)
        return job.next_run_time if job is not None else None

    async def shutdown(self, grace: float) -> list[str]:
        """Stop scheduling, cancel running jobs and give them `grace` seconds to unwind.

        Returns the ids of those still running after it: a job that swallows its
        cancellation, or is blocked outside the loop. They are left to the process's exit.
        """
        self._scheduler.pause()
        running = dict(self._running)
        for task in running:
            task.cancel()
        if running:
            await asyncio.wait(running, timeout=grace)
        self._scheduler.shutdown(wait=False)
        return sorted({job_id for task, job_id in running.items() if not task.done()})
