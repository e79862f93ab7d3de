"""The duty budget: probes may use at most a share of wall time over a trailing window."""

from __future__ import annotations

from collections import deque

DEFAULT_WINDOW_SECONDS = 3600.0


class DutyBudget:
    def __init__(self, share: float, window: float = DEFAULT_WINDOW_SECONDS) -> None:
        self.share = share
        self.window = window
        self._spans: deque[tuple[float, float]] = deque()  # (end time, seconds busy)

    def record(self, end: float, seconds: float) -> None:
        self._spans.append((end, seconds))

    def used(self, now: float) -> float:
        """Share of the trailing window spent probing."""
        while self._spans and self._spans[0][0] < now - self.window:
            self._spans.popleft()
        return sum(seconds for _, seconds in self._spans) / self.window

    def allows(self, now: float, expected: float) -> bool:
        """Whether a round expected to take `expected` seconds still fits in the budget."""
        return self.used(now) + expected / self.window <= self.share
