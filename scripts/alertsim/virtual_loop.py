"""An asyncio event loop on virtual time: days of timers run in moments.

`loop.time()` is a virtual clock that starts at 0. Whenever nothing is ready to run, the loop
jumps the clock straight to its next timer instead of waiting for it, so
`await asyncio.sleep(86400)` returns at once while `loop.time()` moves on by 86400. Everything
built on the loop's clock follows it: `asyncio.sleep`, `asyncio.timeout`, `asyncio.wait_for`,
`call_later`. The wall clock of the simulated world is `loop.wall()`: `base_unix` plus the
virtual time, with a base on a 2-hour boundary so that blocks backfilled into Prometheus
from the simulated samples line up with the TSDB's own.

The jump is made in the selector: asked to wait `timeout` seconds for I/O, it polls the real
selector once without waiting and, when nothing is ready, advances the clock by `timeout`.
So the loop suits in-process work only (httpx's MockTransport, queues, events): a real socket
would get no real time to answer in.

Threads are the one exception to "nothing ready means jump": a blocking call run off the loop
(`run_in_executor`, `asyncio.to_thread`, or a thread of its own that answers through
`call_soon_threadsafe`, as the exporter's file reads do) is waited for in real time while the
clock stands still, so that in virtual time it takes no time, as a quick file read takes
almost none. One still running after `thread_grace` real seconds is taken to be stuck, and the
clock moves on without it, as the real clock would.
"""

from __future__ import annotations

import asyncio
import selectors
import threading
import time
from collections.abc import Callable, Coroutine, Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Final, TypeVar, TypeVarTuple

if TYPE_CHECKING:
    from _typeshed import FileDescriptorLike

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

# 2023-11-14T22:00:00Z: a multiple of 7200 s, the TSDB's block length.
BASE_UNIX: Final = 1_699_999_200.0
# Real seconds a thread the loop waits for may take before it counts as stuck.
THREAD_GRACE_SECONDS: Final = 5.0
# How long, in real time, each wait for a thread's answer lasts before looking again.
_THREAD_POLL_SECONDS: Final = 0.05
# The loop's own executor's threads: idle workers stay alive between calls, so the work handed
# to them is followed instead (`run_in_executor`), not the threads.
_EXECUTOR_THREADS: Final = "virtual-loop-executor"

_Events = list[tuple[selectors.SelectorKey, int]]


class _VirtualSelector(selectors.BaseSelector):
    """The real selector, except that a wait with nothing ready is the loop's to decide."""

    def __init__(self, idle: Callable[[float | None, selectors.BaseSelector], _Events]) -> None:
        self._real = selectors.DefaultSelector()
        self._idle = idle

    def register(
        self, fileobj: FileDescriptorLike, events: int, data: Any = None
    ) -> selectors.SelectorKey:
        return self._real.register(fileobj, events, data)

    def unregister(self, fileobj: FileDescriptorLike) -> selectors.SelectorKey:
        return self._real.unregister(fileobj)

    def modify(
        self, fileobj: FileDescriptorLike, events: int, data: Any = None
    ) -> selectors.SelectorKey:
        return self._real.modify(fileobj, events, data)

    def get_map(self) -> Mapping[FileDescriptorLike, selectors.SelectorKey]:
        return self._real.get_map()

    def close(self) -> None:
        self._real.close()

    def select(self, timeout: float | None = None) -> _Events:
        ready = self._real.select(0)
        if ready or (timeout is not None and timeout <= 0):
            return ready
        return self._idle(timeout, self._real)


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    def __init__(
        self, base_unix: float = BASE_UNIX, *, thread_grace: float = THREAD_GRACE_SECONDS
    ) -> None:
        self._now = 0.0
        self.base_unix = base_unix
        self._thread_grace = thread_grace
        # Threads that ran before the loop existed are none of its business.
        self._threads_before = frozenset(threading.enumerate())
        self._executor_work: set[asyncio.Future[Any]] = set()
        self._busy_since: dict[object, float] = {}  # thread or executor call -> real start
        super().__init__(_VirtualSelector(self._idle))
        self.set_default_executor(ThreadPoolExecutor(thread_name_prefix=_EXECUTOR_THREADS))

    def time(self) -> float:
        """Virtual seconds since the loop was made."""
        return self._now

    def wall(self) -> float:
        """The simulated unix time: `base_unix` plus the virtual time."""
        return self.base_unix + self._now

    def run_in_executor(
        self, executor: Executor | None, func: Callable[[*Ts], T], *args: *Ts
    ) -> asyncio.Future[T]:
        future = super().run_in_executor(executor, func, *args)
        self._executor_work.add(future)
        future.add_done_callback(self._executor_work.discard)
        return future

    def _idle(self, timeout: float | None, real: selectors.BaseSelector) -> _Events:
        """Nothing is ready: wait in real time for threads' answers, then jump to the timer."""
        while self._waiting_on_threads():
            ready = real.select(_THREAD_POLL_SECONDS)
            if ready:
                return ready
        if timeout is None:
            # No timer at all: only another thread or a signal can wake the loop now, as
            # with any loop (a simulation that gets here waits for something never coming).
            return real.select(None)
        self._now += timeout
        return []

    def _waiting_on_threads(self) -> bool:
        real_now = time.monotonic()
        busy = [
            *(
                t
                for t in threading.enumerate()
                if t not in self._threads_before and not t.name.startswith(_EXECUTOR_THREADS)
            ),
            *self._executor_work,
        ]
        if not busy:
            self._busy_since.clear()
            return False
        since = {item: self._busy_since.get(item, real_now) for item in busy}
        self._busy_since = since
        return any(real_now - started < self._thread_grace for started in since.values())


def run_virtual(main: Coroutine[Any, Any, T], *, base_unix: float = BASE_UNIX) -> T:
    """Run `main` to completion on a new virtual-time loop, then close the loop."""
    with asyncio.Runner(loop_factory=lambda: VirtualTimeLoop(base_unix)) as runner:
        return runner.run(main)


def running_virtual_loop() -> VirtualTimeLoop:
    """The running loop, which must be a virtual-time one."""
    loop = asyncio.get_running_loop()
    if not isinstance(loop, VirtualTimeLoop):
        raise TypeError("not running on a VirtualTimeLoop")
    return loop
