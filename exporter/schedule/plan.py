"""When probe rounds run: each setting declared once, with its default, bound and meaning.

What a round measures is `exporter.probe.plan`; the two meet in `exporter.config.settings`.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

# The duty budget's window: an hour, or one interval where rounds come less often.
MIN_DUTY_WINDOW_SECONDS = 3600.0


class Schedule(BaseModel):
    """Rounds every `interval` (plus up to `jitter`), within `duty_budget` of wall time; the
    server's /props every `discovery_interval`. Checked against the round's timeout by
    `exporter.config.settings`, where both are known."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # A round of the defaults on a 22 t/s server (warm-up, 3 x pp512 + tg128) takes about 20 s:
    # every 20 minutes that is 1.7% of wall time, inside the 2% duty budget.
    interval: float = Field(
        1200.0, gt=0, allow_inf_nan=False, description="seconds between probe rounds"
    )
    jitter: float = Field(
        10.0, ge=0, allow_inf_nan=False, description="random seconds added to each interval"
    )
    discovery_interval: float = Field(
        30.0, gt=0, allow_inf_nan=False, description="seconds between /props reads"
    )
    duty_budget: float = Field(0.02, gt=0, le=1, description="max share of wall time for probes")

    @property
    def duty_window(self) -> float:
        return max(MIN_DUTY_WINDOW_SECONDS, self.interval)
