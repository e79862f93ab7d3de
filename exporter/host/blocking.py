"""Blocking I/O that may never return, run where it cannot hold the process up.

A file on a hung NFS or FUSE mount blocks open() and read() in the kernel, and no timeout or
cancellation reaches a thread stuck there. asyncio.to_thread and every ThreadPoolExecutor are
joined when the loop closes and when the interpreter exits, so one stuck read there keeps a
stopped exporter alive for good. Each call here runs on a fresh daemon thread that nothing
joins; the caller awaits it for at most a deadline, then goes on without it.

One call at a time per `BlockingSlot`: while a call is still blocked (past its deadline or
not), the next one is refused rather than started, so a mount that stays hung costs one
thread, not one per attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
from collections.abc import Callable
from typing import Final, TypeVar

T = TypeVar("T")

# A header read of a local or healthy network file takes milliseconds; past this it is stuck.
DEFAULT_DEADLINE_SECONDS: Final = 10.0


class BlockedCallError(Exception):
    """The call gave no answer: it ran past its deadline, or an earlier one is still blocked."""


class DeadlineExceededError(BlockedCallError):
    """The call did not return within the deadline; its thread is left behind, unjoined."""


class StillBlockedError(BlockedCallError):
    """The previous call has not returned yet, so this one was not started."""


class BlockingSlot:
    """Runs one blocking call at a time on its own daemon thread, awaited with a deadline."""

    def __init__(self, deadline: float = DEFAULT_DEADLINE_SECONDS) -> None:
        self.deadline = deadline
        self._lock = threading.Lock()
        self._outstanding = False  # a call's thread has not returned yet

    @property
    def outstanding(self) -> bool:
        with self._lock:
            return self._outstanding

    async def run(self, func: Callable[[], T], *, name: str) -> T:
        """`func()`'s result or exception; DeadlineExceededError or StillBlockedError when it
        gives none. `name` names the thread, as a forced shutdown lists what still runs."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._outstanding:
                raise StillBlockedError(f"{name}: the previous call is still blocked")
            self._outstanding = True
        done: asyncio.Future[T] = loop.create_future()

        def work() -> None:
            outcome: Callable[[], None]
            try:
                outcome = functools.partial(_resolve, done, func())
            except BaseException as exc:  # handed to the awaiting task, whatever it is
                outcome = functools.partial(_reject, done, exc)
            finally:
                with self._lock:
                    self._outstanding = False
            # RuntimeError: the loop closed while this call was blocked; nobody waits for it.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(outcome)

        try:
            threading.Thread(target=work, name=name, daemon=True).start()
        except BaseException:
            with self._lock:
                self._outstanding = False
            raise
        limit = asyncio.timeout(self.deadline)
        try:
            async with limit:
                return await done
        except TimeoutError:
            if not limit.expired():
                raise  # func's own TimeoutError: an NFS server's ETIMEDOUT is one
            raise DeadlineExceededError(
                f"{name}: no answer within {self.deadline:g} s; its thread is left behind"
            ) from None


# Each checks `done` first: the caller may have given up (its deadline passed, it was cancelled).
def _resolve(done: asyncio.Future[T], result: T) -> None:
    if not done.done():
        done.set_result(result)


def _reject(done: asyncio.Future[T], error: BaseException) -> None:
    if not done.done():
        done.set_exception(error)
