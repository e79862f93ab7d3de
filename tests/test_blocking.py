"""Blocking calls on daemon threads: a deadline for the caller, one call at a time, no join."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest

from exporter.host.blocking import BlockingSlot, DeadlineExceededError, StillBlockedError

# Generous against a loaded machine: the tests check that a call ends, not how fast.
SETTLE_S = 10.0


def threads_named(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == name]


@pytest.fixture
def release() -> Iterator[threading.Event]:
    """What a "hung" call waits for; set at the end so that no test leaves a thread behind."""
    event = threading.Event()
    yield event
    event.set()


def test_a_result_and_an_exception_come_back() -> None:
    slot = BlockingSlot(SETTLE_S)

    def fail() -> int:
        raise ValueError("from the thread")

    async def main() -> None:
        assert await slot.run(lambda: 42, name="t-ok") == 42
        with pytest.raises(ValueError, match="from the thread"):
            await slot.run(fail, name="t-fail")
        assert not slot.outstanding

    asyncio.run(main())


def test_the_calls_own_timeout_is_not_the_deadline() -> None:
    # An NFS read that fails with ETIMEDOUT raises TimeoutError: that is its answer.
    def nfs_timeout() -> None:
        raise TimeoutError("ETIMEDOUT")

    async def main() -> None:
        with pytest.raises(TimeoutError, match="ETIMEDOUT") as err:
            await BlockingSlot(SETTLE_S).run(nfs_timeout, name="t-nfs")
        assert not isinstance(err.value, DeadlineExceededError)

    asyncio.run(main())


def test_a_hung_call_meets_the_deadline_and_blocks_no_second_one(
    release: threading.Event,
) -> None:
    slot = BlockingSlot(deadline=0.2)
    calls: list[str] = []

    def hung(label: str) -> str:
        calls.append(label)
        release.wait()
        return label

    async def main() -> None:
        started = time.monotonic()
        with pytest.raises(DeadlineExceededError):
            await slot.run(lambda: hung("first"), name="t-hung")
        assert 0.2 <= time.monotonic() - started < SETTLE_S
        (thread,) = threads_named("t-hung")
        assert thread.daemon, "the exit must not join it"
        assert slot.outstanding
        # While it is blocked, another call is refused at once, and starts no thread.
        with pytest.raises(StillBlockedError):
            await slot.run(lambda: hung("second"), name="t-hung")
        assert calls == ["first"] and threads_named("t-hung") == [thread]

        release.set()
        thread.join(SETTLE_S)
        assert not thread.is_alive() and not slot.outstanding
        assert await slot.run(lambda: "again", name="t-hung") == "again"

    asyncio.run(main())


def test_a_cancelled_caller_leaves_the_thread_to_finish_alone(
    release: threading.Event, monkeypatch: pytest.MonkeyPatch
) -> None:
    slot = BlockingSlot(SETTLE_S)
    raised: list[threading.ExceptHookArgs] = []
    monkeypatch.setattr(threading, "excepthook", raised.append)

    async def main() -> None:
        task = asyncio.create_task(slot.run(release.wait, name="t-cancelled"))
        deadline = time.monotonic() + SETTLE_S
        while not threads_named("t-cancelled"):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)  # polling for the thread to start, within a deadline
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    # The loop is closed: the thread's answer has nowhere to go, and must not raise.
    (thread,) = threads_named("t-cancelled")
    release.set()
    thread.join(SETTLE_S)
    assert not thread.is_alive() and not slot.outstanding
    assert raised == []
