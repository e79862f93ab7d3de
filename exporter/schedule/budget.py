"""The duty budget: probes may use at most a share of wall time over a trailing window.

A round is admitted while what the probes used, plus what the next round is expected to take
(the last round that measured), stays within the share. Rounds skipped at the server (busy,
asleep) still count what they spent, but do not lower that expectation.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable


class DutyBudget:
    def __init__(
        self, share: float, window: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.share = share
        self.window = window
        self._clock = clock
        self._spans: deque[tuple[float, float]] = deque()  # (end time, seconds busy)
        self._expected = 0.0  # what the next round is expected to take

    def used(self) -> float:
        """Share of the trailing window spent probing."""
        now = self._clock()
        while self._spans and self._spans[0][0] < now - self.window:
            self._spans.popleft()
        return sum(seconds for _, seconds in self._spans) / self.window

    def admits(self) -> bool:
        """Whether a round expected to take as long as the last measured one still fits."""
        return self.used() + self._expected / self.window <= self.share

    def spend(self, seconds: float, *, measured: bool) -> None:
        """A round just ended after `seconds`; `measured` when it sent probes."""
        self._spans.append((self._clock(), seconds))
        if measured:
            self._expected = seconds
