"""Each series' usual speed: the band its recent valid rounds keep, and what a new round says.

A series is one figure of one served file: (target, model, ctx, depth, probe kind). Its band
is the median of its valid rounds over the last `BAND_WINDOW_SECONDS` (at most
`MAX_BAND_ROUNDS`) and their robust spread (1.4826 x the median absolute deviation: the
standard deviation where the noise is normal, unmoved by a rare outlier). A round is judged
against the band its earlier rounds made, then joins it.

Confirmation rounds: a round whose verdict (below, within or above the band) differs from the
one the series has settled on starts a confirmation. The daemon then runs up to
`Schedule.confirmations` more rounds soon after; each that agrees with the new verdict counts,
and once all have agreed the series settles on it. One that disagrees ends the confirmation,
and the settled verdict stands: that round was an outlier. So a lasting change, a drop as
well as the recovery from it, is confirmed within minutes, while a single slow round costs a
round or two and moves nothing.

`recent` is the median of the last `RECENT_ROUNDS` rounds, confirmation rounds included and
rounds a confirmation refuted left out: the figure the regression alerts compare with the
band. After a drop it moves once the first confirmation agrees; a lone outlier moves it for
the 90 s until its confirmation refutes it, and then never again.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Final, Literal

from exporter.frozen import Frozen
from exporter.probe.results import Kind

# Three days of rounds: at the default 1200 s interval about 216 of them, so the median and
# spread rest on many rounds and a bad day does not move them; a lasting change becomes the
# new normal after about a day and a half, when a regression alert for it resolves.
BAND_WINDOW_SECONDS: Final = 3 * 86400.0
MAX_BAND_ROUNDS: Final = 256  # bounds memory and the state file where rounds come often
# Fewer rounds than this give no band: a median and spread of a handful mean little.
MIN_BAND_ROUNDS: Final = 12
RECENT_ROUNDS: Final = 3
# Out of band: further from the median than this many spreads, or than this share of it,
# whichever is larger. Tighter than any regression threshold the rules use (3 spreads or 10%
# at least), so that every round that could start an alert is confirmed first, and a drop
# just past an alert's threshold is not taken for noise and refuted; the share keeps a very
# quiet series from confirming every small wobble. On a noisy series one round in about 22
# is confirmed for nothing, a round more in the budget.
OUTSIDE_SPREADS: Final = 2.0
OUTSIDE_SHARE: Final = 0.05
MAD_TO_SIGMA: Final = 1.4826
# Series of files not seen for the band's window are forgotten; past this many, the least
# recently measured go first, so that a router cycling through models cannot grow memory.
MAX_SERIES: Final = 256
# Rounds a state file dates later than this past the clock are not restored.
FUTURE_ALLOWANCE_SECONDS: Final = 3600.0

Verdict = Literal["below", "within", "above"]

# Why a confirmation round ran: the round that started it fell below or above the band, or
# came back within it after a confirmed change.
BELOW_BAND: Final = "below_band"
ABOVE_BAND: Final = "above_band"
BACK_IN_BAND: Final = "back_in_band"
CONFIRMATION_REASONS: Final = (BELOW_BAND, ABOVE_BAND, BACK_IN_BAND)


@dataclass(frozen=True)
class SeriesKey:
    target: str
    model: str
    ctx: int
    depth: int
    kind: Kind


@dataclass(frozen=True)
class BandFigures(Frozen):
    """What /metrics shows of a series' band."""

    recent: float  # median of the last RECENT_ROUNDS rounds
    rounds: int  # rounds the band holds
    history_seconds: float  # from its oldest round to its newest
    median: float | None  # None until it holds MIN_BAND_ROUNDS rounds
    spread: float | None


@dataclass
class Band:
    file: str  # the served file's identity; another file under the same name starts afresh
    rounds: deque[tuple[float, float]] = field(default_factory=deque)  # (unix time, tokens/s)
    settled: Verdict = "within"
    confirming: Verdict | None = None  # the verdict a confirmation is testing
    agreed: int = 0  # confirmation rounds that agreed with it so far
    testing: list[float] = field(default_factory=list)  # times of the rounds under test
    # Times of rounds a confirmation refuted: they stay in the band, whose median they cannot
    # move, but leave `recent`, so that two lone outliers a scheduled round apart never make
    # a median of three.
    refuted: set[float] = field(default_factory=set)

    def figures(self) -> BandFigures | None:
        if not self.rounds:
            return None
        values = [v for _, v in self.rounds]
        last = [v for t, v in self.rounds if t not in self.refuted][-RECENT_ROUNDS:]
        median, spread = (
            _median_and_spread(values) if len(values) >= MIN_BAND_ROUNDS else (None, None)
        )
        return BandFigures(
            recent=statistics.median(last or values[-RECENT_ROUNDS:]),
            rounds=len(values),
            history_seconds=self.rounds[-1][0] - self.rounds[0][0],
            median=median,
            spread=spread,
        )

    def verdict(self, value: float) -> Verdict:
        """Where `value` lies against the band of the rounds so far."""
        if len(self.rounds) < MIN_BAND_ROUNDS:
            return "within"
        median, spread = _median_and_spread([v for _, v in self.rounds])
        margin = max(OUTSIDE_SPREADS * spread, OUTSIDE_SHARE * median)
        if value < median - margin:
            return "below"
        if value > median + margin:
            return "above"
        return "within"

    def add(self, at: float, value: float) -> None:
        self.rounds.append((at, value))
        self.expire(at)

    def expire(self, now: float) -> None:
        while self.rounds and (
            len(self.rounds) > MAX_BAND_ROUNDS or self.rounds[0][0] < now - BAND_WINDOW_SECONDS
        ):
            self.rounds.popleft()
        oldest = self.rounds[0][0] if self.rounds else now
        self.refuted = {t for t in self.refuted if t >= oldest}

    def observe(
        self, verdict: Verdict, at: float, *, confirmation: bool, needed: int
    ) -> str | None:
        """Step the confirmation state on the verdict of a round of time `at`; returns the
        reason a confirmation should follow, or None."""
        if not confirmation:
            self.confirming, self.agreed, self.testing = None, 0, []
            if verdict == self.settled or needed == 0:
                self.settled = verdict
                return None
            self.confirming, self.testing = verdict, [at]
            return _reason(verdict)
        if self.confirming is None:
            return None  # this series asked for nothing; another one of the round did
        if verdict != self.confirming:
            # Outliers: the settled verdict stands, and the rounds tested leave `recent`.
            self.refuted.update(self.testing)
            self.confirming, self.agreed, self.testing = None, 0, []
            return None
        self.agreed += 1
        self.testing.append(at)
        if self.agreed >= needed:
            self.settled, self.confirming, self.agreed, self.testing = verdict, None, 0, []
            return None
        return _reason(verdict)


def _reason(verdict: Verdict) -> str:
    # "within" is only ever tested after a confirmed change: the series coming back.
    if verdict == "below":
        return BELOW_BAND
    if verdict == "above":
        return ABOVE_BAND
    return BACK_IN_BAND


def _median_and_spread(values: list[float]) -> tuple[float, float]:
    median = statistics.median(values)
    mad = statistics.median(abs(v - median) for v in values)
    return median, MAD_TO_SIGMA * mad


class Baselines:
    """Every series' band. Owned by the store, which calls it under its lock."""

    def __init__(self) -> None:
        self._bands: dict[SeriesKey, Band] = {}

    def record(
        self,
        key: SeriesKey,
        file: str,
        at: float,
        value: float,
        *,
        confirmation: bool,
        needed: int,
    ) -> tuple[BandFigures, str | None]:
        """Judge a round's figure against its series' band, then add it. Returns what the band
        now shows, and the reason for a confirmation round, if one should follow."""
        band = self._bands.get(key)
        if band is None or band.file != file:
            band = self._bands[key] = Band(file)
            self._trim(at)
        band.expire(at)
        verdict = band.verdict(value)
        reason = band.observe(verdict, at, confirmation=confirmation, needed=needed)
        band.add(at, value)
        self._bands[key] = self._bands.pop(key)  # most recently measured last
        figures = band.figures()
        assert figures is not None  # noqa: S101 - it was just given a round
        return figures, reason

    def figures(self, key: SeriesKey) -> BandFigures | None:
        band = self._bands.get(key)
        return band.figures() if band is not None else None

    def of_file(
        self, target: str, model: str, ctx: int, file: str
    ) -> dict[tuple[int, Kind], BandFigures]:
        """The figures of every band of one served file, by depth and kind: what a restarted
        exporter shows from its state file before its first round."""
        found = {}
        for key, band in self._bands.items():
            if (key.target, key.model, key.ctx) == (target, model, ctx) and band.file == file:
                figures = band.figures()
                if figures is not None:
                    found[key.depth, key.kind] = figures
        return found

    def _trim(self, now: float) -> None:
        for key in [
            k
            for k, b in self._bands.items()
            if b.rounds and b.rounds[-1][0] < now - BAND_WINDOW_SECONDS
        ]:
            del self._bands[key]
        while len(self._bands) > MAX_SERIES:
            del self._bands[next(iter(self._bands))]

    def dump(self) -> list[dict[str, object]]:
        """The bands' rounds, for the state file (`exporter.state.storage`)."""
        return [
            {
                "target": k.target,
                "model": k.model,
                "ctx": k.ctx,
                "depth": k.depth,
                "probe": k.kind,
                "file": b.file,
                "rounds": [list(r) for r in b.rounds],
            }
            for k, b in self._bands.items()
        ]

    def load(
        self, key: SeriesKey, file: str, rounds: list[tuple[float, float]], now: float
    ) -> None:
        """Restore a series' rounds from the state file; they must be checked already."""
        band = Band(file, deque(sorted(rounds)[-MAX_BAND_ROUNDS:]))
        band.expire(now)
        if band.rounds:
            self._bands[key] = band
            self._trim(now)
