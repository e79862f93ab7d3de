"""When probe rounds run: each setting declared once, with its default, bound and meaning.

What a round measures is `exporter.probe.plan`; the two meet in `exporter.config.settings`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from exporter.declared import Declared, setting

# The duty budget's window: an hour, or one interval where rounds come less often.
MIN_DUTY_WINDOW_SECONDS = 3600.0
# Upper bounds: APScheduler adds the interval and jitter to datetimes, and past year 9999
# (an interval of about 2.5e11 s) that overflows inside the scheduler, which then runs no job
# again while /healthz still says ok. Far below that, these are longer than anyone means to
# wait between rounds or /props reads.
MAX_INTERVAL_SECONDS = 7 * 86400.0
MAX_JITTER_SECONDS = 86400.0
MAX_DISCOVERY_INTERVAL_SECONDS = 86400.0
MAX_CONFIRMATIONS = 5
# After a start, each target's first round comes this long, plus up to min(jitter, spread),
# after it: soon, and spread so that several targets do not all probe at the same moment.
FIRST_ROUND_DELAY_SECONDS = 1.0
FIRST_ROUND_SPREAD_SECONDS = 5.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Schedule(Declared):
    """Rounds every `interval` (plus up to `jitter`), within `duty_budget` of wall time; the
    server's /props every `discovery_interval`. Checked against the round's timeout by
    `exporter.config.settings`, where both are known."""

    # A round of the defaults on a 22 t/s server (warm-up, 3 x pp512 + tg128) takes about 20 s:
    # every 20 minutes that is 1.7% of wall time; the 3% duty budget leaves room for the two
    # confirmation rounds that follow a round outside its band (2.8% in that hour).
    interval: float = setting(
        1200.0,
        "seconds between probe rounds (at most 604800, 7 days)",
        gt=0,
        le=MAX_INTERVAL_SECONDS,
    )
    jitter: float = setting(
        10.0, "random seconds added to each interval (at most 86400)", ge=0, le=MAX_JITTER_SECONDS
    )
    discovery_interval: float = setting(
        30.0,
        "seconds between /props reads (at most 86400)",
        gt=0,
        le=MAX_DISCOVERY_INTERVAL_SECONDS,
    )
    duty_budget: float = setting(0.03, "max share of wall time for probes", gt=0, le=1)
    # Two confirmations: a change must hold for three rounds in a row before a series
    # settles on it, which a one-off slow round (a page-in, a thermal blip) never does.
    confirmations: int = setting(
        2,
        "rounds run soon after one outside its series' usual band (0: none; at most 5)",
        ge=0,
        le=MAX_CONFIRMATIONS,
    )
    confirmation_delay: float = setting(
        90.0, "seconds from a round to its confirmation round", gt=0, le=MAX_INTERVAL_SECONDS
    )

    @property
    def confirmation_rounds(self) -> int:
        """Confirmations that run: none where the next scheduled round comes as soon."""
        return self.confirmations if self.confirmation_delay < self.interval else 0

    def first_round_delay(self) -> float:
        """Seconds from a start to a target's first round: one draw of `random`."""
        return FIRST_ROUND_DELAY_SECONDS + random.uniform(
            0, min(self.jitter, FIRST_ROUND_SPREAD_SECONDS)
        )

    @property
    def duty_window(self) -> float:
        return max(MIN_DUTY_WINDOW_SECONDS, self.interval)
