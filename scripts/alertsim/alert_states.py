"""Prometheus 2.42's alerting state machine (rules/alerting.go, AlertingRule.Eval), replayed
over the label sets an alert's expression returned at each evaluation."""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import TypeAlias

# An alert's identity: its labels, sorted, as Prometheus hashes them.
LabelKey: TypeAlias = tuple[tuple[str, str], ...]

_DURATION = re.compile(
    r"(?:(\d+)y)?(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?(?:(\d+)ms)?"
)
_DAY_MS = 86_400_000
_UNIT_MS = (365 * _DAY_MS, 7 * _DAY_MS, _DAY_MS, 3_600_000, 60_000, 1_000, 1)


@dataclass(frozen=True)
class AlertEpisode:
    """One alert from going pending to being dropped or resolved; times in unix seconds as
    evaluated, in trace seconds once taken `since` a run's start."""

    name: str
    labels: dict[str, str]
    pending_at: float
    fired_at: float | None
    resolved_at: float | None

    @property
    def severity(self) -> str:
        return self.labels.get("severity", "")

    def since(self, origin: float) -> AlertEpisode:
        """The same episode with its times counted from `origin`, to the millisecond."""

        def shifted(t: float | None) -> float | None:
            return None if t is None else round(t - origin, 3)

        return AlertEpisode(
            self.name, dict(self.labels), round(self.pending_at - origin, 3),
            shifted(self.fired_at), shifted(self.resolved_at),
        )  # fmt: skip

    def describe(self) -> str:
        shown = {k: v for k, v in self.labels.items() if k not in ("job", "instance")}
        return (
            f"{self.name}{shown} pending {self.pending_at:g} fired {self.fired_at} "
            f"resolved {self.resolved_at}"
        )


@dataclass
class _ActiveAlert:
    labels: LabelKey
    active_at_ms: int
    fired_at_ms: int | None = None
    # The evaluation that first missed a firing alert, while keep_firing_for holds it.
    keep_firing_since_ms: int | None = None


def parse_duration_ms(text: str) -> int:
    """A Prometheus duration ("5m", "1h30m", "90s", "0") in milliseconds."""
    if text == "0":
        return 0
    match = _DURATION.fullmatch(text)
    if not text or match is None:
        raise ValueError(f"not a Prometheus duration: {text!r}")
    return sum(
        int(count) * unit for count, unit in zip(match.groups(), _UNIT_MS, strict=True) if count
    )


def track_episodes(
    name: str,
    evaluations: Iterable[tuple[int, Collection[LabelKey]]],
    *,
    hold_ms: int,
    keep_firing_for_ms: int = 0,
) -> list[AlertEpisode]:
    """The episodes of alert `name`, given for every evaluation, in order, its time (unix ms)
    and the label sets its expression returned then, `labels:` applied."""
    active: dict[LabelKey, _ActiveAlert] = {}
    episodes: list[AlertEpisode] = []
    for at_ms, present in evaluations:
        for labels in present:
            active.setdefault(labels, _ActiveAlert(labels, at_ms))
        for labels, alert in list(active.items()):
            if labels in present:
                alert.keep_firing_since_ms = None
            elif not _kept_firing(alert, at_ms, keep_firing_for_ms):
                del active[labels]
                resolved_at = at_ms if alert.fired_at_ms is not None else None
                episodes.append(_episode(name, alert, resolved_at))
                continue
            if alert.fired_at_ms is None and at_ms - alert.active_at_ms >= hold_ms:
                alert.fired_at_ms = at_ms
    episodes += [_episode(name, alert, None) for alert in active.values()]
    return episodes


def _kept_firing(alert: _ActiveAlert, at_ms: int, keep_firing_for_ms: int) -> bool:
    # 2.42 counts keep_firing_for from the first evaluation without the alert, not from the
    # last one with it.
    if alert.fired_at_ms is None or keep_firing_for_ms <= 0:
        return False
    if alert.keep_firing_since_ms is None:
        alert.keep_firing_since_ms = at_ms
    return at_ms - alert.keep_firing_since_ms < keep_firing_for_ms


def _episode(name: str, alert: _ActiveAlert, resolved_at_ms: int | None) -> AlertEpisode:
    return AlertEpisode(
        name=name,
        labels=dict(alert.labels),
        pending_at=alert.active_at_ms / 1000,
        fired_at=None if alert.fired_at_ms is None else alert.fired_at_ms / 1000,
        resolved_at=None if resolved_at_ms is None else resolved_at_ms / 1000,
    )
