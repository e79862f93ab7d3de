"""The two clocks the daemon reads: one for durations, one for timestamps.

Injected as one value, so that a simulation can run the daemon's real scheduling, budget and
confirmation code on a virtual clock (scripts/alert_sim.py) while the product reads the
system's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Clock:
    monotonic: Callable[[], float] = time.monotonic  # durations, deadlines, the duty budget
    wall: Callable[[], float] = time.time  # unix timestamps of rounds and samples


SYSTEM_CLOCK = Clock()
