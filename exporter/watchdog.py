"""The last resort of a shutdown: end the process if it has not ended by a deadline.

SIGTERM must end the exporter within 5 s (`exporter.daemon`). The orderly stop (cancel the
jobs, close the web server and the clients) fits in that, but a thread blocked where nothing
reaches it would hold the process for ever: a DNS lookup on asyncio's default executor, which
`asyncio.run` and the interpreter's exit both join without a timeout, or NVML in a wedged
driver. Armed when the stop is requested, a daemon thread waits out the deadline, logs
`shutdown_forced` with what still runs, and calls os._exit, which joins nothing.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Collection, Mapping
from typing import Final

import structlog

log = structlog.get_logger(__name__)

# The exit status of a forced shutdown: not 0, since the orderly stop did not finish, and
# neither 1 (cannot listen) nor 2 (config error).
EXIT_SHUTDOWN_FORCED: Final = 3
# The log line waits at most this long: stderr may be a full pipe that nobody reads, and
# writing to it must not hold the exit it announces.
_LOG_WAIT_SECONDS: Final = 1.0


def running_threads(exclude: Collection[threading.Thread] = ()) -> list[str]:
    """The threads alive now, by name, daemon threads marked: what a forced exit cuts short."""
    return [
        f"{t.name} (daemon)" if t.daemon else t.name
        for t in threading.enumerate()
        if t not in exclude
    ]


class ShutdownWatchdog:
    """Ends the process `deadline` seconds after `arm`, unless it has exited by then.

    `describe` says what still runs (in-flight jobs), beside the threads; `exit` and the
    disarm are for tests, which run the daemon inside the test process.
    """

    def __init__(
        self,
        deadline: float,
        describe: Callable[[], Mapping[str, object]] = dict,
        *,
        exit_process: Callable[[int], object] = os._exit,
    ) -> None:
        self.deadline = deadline
        self._describe = describe
        self._exit = exit_process
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._disarmed = threading.Event()

    def arm(self) -> None:
        """Start the countdown; later calls keep the first one's. Any thread may call it."""
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(
                target=self._watch, name="shutdown-watchdog", daemon=True
            )
            self._thread.start()

    def disarm(self) -> None:
        self._disarmed.set()

    def _watch(self) -> None:
        if self._disarmed.wait(self.deadline):
            return
        writer = threading.Thread(target=self._report, name="shutdown-report", daemon=True)
        writer.start()
        writer.join(_LOG_WAIT_SECONDS)
        self._exit(EXIT_SHUTDOWN_FORCED)

    def _report(self) -> None:
        ours = {threading.current_thread(), *([self._thread] if self._thread else [])}
        try:
            running = dict(self._describe())
        except Exception as exc:  # a broken description must not stop the exit
            running = {"describe_failed": repr(exc)}
        log.error(
            "shutdown_forced",
            deadline_s=self.deadline,
            exit_code=EXIT_SHUTDOWN_FORCED,
            threads=running_threads(exclude=ours),
            **running,
        )
