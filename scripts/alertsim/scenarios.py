"""Named traces that the shipped alerts must get right, each with what must happen, and the
run that checks them: `run_scenario(name, seed)` simulates one (`alert_sim.simulate_alerts`)
and says whether it met its expectations (`Outcome.problems`).

The expectations are the alerts' acceptance criteria, at the exporter's default probe plan
and interval:

* a sustained 15% drop of token generation (TG) or prompt processing (PP) fires the
  regression alert within 15 minutes of the first round that sees it;
* a 30% drop fires the critical alert within 5 minutes of it;
* 30 days of steady speeds at 2% noise, with a daily single-round outlier (-40%),
  llama-server restarts, an exporter restart and a model change fire nothing;
* at 6% noise: 30 days fire nothing, and a 25% drop still fires.

A scenario's expectations are the same for every seed; the seed only draws the noise and the
schedule's jitter. `drop25_cv6` drops once the band holds its full 3 days of rounds;
`drop25_cv6_young` is the same drop on a band of 8 hours (24 rounds), whose spread is a
rougher estimate: the figures show how often that misses, the tests leave it out.

Times are seconds of trace time. Time to alert is measured from the start of the first
scheduled round at or after the change, as the simulation ran it, to the episode's
`fired_at`.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from alert_sim import SimOptions, SimResult, scheduled_round_starts, simulate_alerts

from alertsim.alert_states import AlertEpisode
from alertsim.trace import (
    DAY,
    DEFAULT_PP_TPS,
    DEFAULT_TG_TPS,
    EXPORTER_RESTART,
    MODEL_CHANGE,
    RESTART,
    Trace,
    TraceBuilder,
)
from alertsim.trace_server import model_path
from exporter import log as exporter_log

HOUR: Final = 3600.0
MINUTE: Final = 60.0
GENERATION: Final = "LlamaSpeedGenerationRegression"
PROMPT: Final = "LlamaSpeedPromptRegression"
WARNING: Final = "warning"
CRITICAL: Final = "critical"
# What the regression alerts of the simulated target must carry: its one target, the model
# it serves before any model change, and the default plan's one depth.
TARGET_LABELS: Final = {
    "target": "sim",
    "model": model_path(0).rsplit("/", 1)[-1].removesuffix(".gguf"),
    "depth": "0",
}

# A change comes once every series is armed (its band spans the rules' 6 hours) with a
# margin, at an odd second so that it falls between rounds wherever the jitter puts them.
CHANGE_AT: Final = 8 * HOUR + 437.0
# The same time of day once the band is full: 3 days of rounds, as on a box that has run
# the exporter for a while.
MATURE_CHANGE_AT: Final = 3 * DAY + CHANGE_AT
# A short scenario runs long enough past its change to show what the alert does next.
SHORT_END: Final = 12 * HOUR
LONG_DAYS: Final = 30
# A single-round outlier: the speeds of one scheduled round times this, from a little before
# the round starts to well after it ends (a round takes about 13 s, 22 s slowed), and back
# long before its confirmation round, which starts 90 s after the round ends.
OUTLIER_FACTOR: Final = 0.6
OUTLIER_BEFORE_SECONDS: Final = 20.0
OUTLIER_AFTER_SECONDS: Final = 40.0
# Outliers keep this far from a restart or a model change, so that each one is a lone slow
# round of an armed series and nothing else...
OUTLIER_CLEARANCE: Final = HOUR
# ...and this far after a model change, by when the new model's series has a band (12 rounds
# at the default interval take 4 hours) that an outlier can fall outside of.
OUTLIER_AFTER_MODEL_CHANGE: Final = 6 * HOUR


@dataclass(frozen=True)
class MustFire:
    """An alert that must fire for the change: `alert` at `severity` (None: either), within
    `within_s` of the first round at or after the change, and, where `resolve_within_s` is
    set, resolved within that long of the first round at or after the recovery."""

    alert: str
    severity: str | None
    within_s: float
    resolve_within_s: float | None = None

    @property
    def key(self) -> str:
        return f"{self.alert}/{self.severity or 'any'}"


@dataclass(frozen=True)
class Expectations:
    must_fire: tuple[MustFire, ...] = ()
    # (alert, severity) that may fire too once the change has come, such as a drop's warning
    # beside its critical; anything else that fires is a false alert.
    may_fire: frozenset[tuple[str, str]] = frozenset()
    change_at: float | None = None  # when the speed changes
    recovery_at: float | None = None  # when it is back
    confirmations: bool = False  # the trace has rounds outside the band, to be confirmed


@dataclass(frozen=True)
class Built:
    """One seed's trace of a scenario, and the rounds its outliers were placed on."""

    trace: Trace
    outlier_rounds: tuple[float, ...] = ()


@dataclass(frozen=True)
class Scenario:
    name: str
    summary: str
    noise_cv: float
    expected: Expectations
    _build: Callable[[SimOptions], Built] = field(repr=False)

    def options(self, seed: int) -> SimOptions:
        return SimOptions(noise_cv=self.noise_cv, seed=seed)

    def build(self, seed: int) -> Built:
        return self._build(self.options(seed))


# --- the traces ----------------------------------------------------------------------------


def _drop(
    factor: float,
    *,
    tg: bool,
    pp: bool,
    at: float = CHANGE_AT,
    lasts: float | None = None,
    end: float = SHORT_END,
) -> Trace:
    builder = TraceBuilder().scaled(at, factor, tg=tg, pp=pp)
    if lasts is not None:
        builder.at(at + lasts, tg_tps=DEFAULT_TG_TPS, pp_tps=DEFAULT_PP_TPS)
    return builder.build(end)


def _with_events(events: Iterable[tuple[float, str]], end: float) -> Trace:
    builder = TraceBuilder()
    for t, event in sorted(events):
        builder.at(t, event=event)
    return builder.build(end)


def outlier_rounds(
    trace: Trace, options: SimOptions, aims: Iterable[float], *, clearance: float
) -> tuple[float, ...]:
    """For each time in `aims`, the first scheduled round at or after it (as a run of `trace`
    with `options` schedules it: `scheduled_round_starts`) that is `clearance` away from every
    restart and model change and `OUTLIER_AFTER_MODEL_CHANGE` after a model change."""
    starts = scheduled_round_starts(trace, options)
    events = [row.t for row in trace.rows if row.event]
    model_changes = trace.events(MODEL_CHANGE)

    def clear(t: float) -> bool:
        return all(abs(t - e) >= clearance for e in events) and not any(
            0 <= t - change < OUTLIER_AFTER_MODEL_CHANGE for change in model_changes
        )

    rounds: list[float] = []
    for aim in aims:
        start = next((t for t in starts if t >= aim and clear(t)), None)
        if start is not None and start not in rounds:
            rounds.append(start)
    return tuple(rounds)


def with_outliers(trace: Trace, rounds: Sequence[float], factor: float) -> Trace:
    """`trace` with each round of `rounds` slowed by `factor` (`TraceBuilder.outlier`), its
    rows kept; an outlier's window must not hold a row of `trace`."""
    first = trace.rows[0]
    builder = TraceBuilder(tg_tps=first.tg_tps, pp_tps=first.pp_tps)
    pending = sorted(rounds)
    for row in trace.rows[1:-1]:
        while pending and pending[0] < row.t:
            start = pending.pop(0)
            if start + OUTLIER_AFTER_SECONDS >= row.t:
                raise ValueError(f"the outlier at {start:g} overlaps the row at {row.t:g}")
            builder.outlier(start, factor, before=OUTLIER_BEFORE_SECONDS,
                            after=OUTLIER_AFTER_SECONDS)  # fmt: skip
        builder.at(row.t, tg_tps=row.tg_tps, pp_tps=row.pp_tps, event=row.event)
    for start in pending:
        builder.outlier(start, factor, before=OUTLIER_BEFORE_SECONDS, after=OUTLIER_AFTER_SECONDS)
    return builder.build(trace.end)


def _daily_outlier_aims(days: int) -> list[float]:
    # A different hour each day (7 is prime to 24), so that outliers meet every part of the
    # schedule's drift; none on the first day, before the series are armed.
    return [d * DAY + (7 * d % 24) * HOUR + 30 * MINUTE for d in range(1, days)]


# The long scenarios' events: llama-server restarts spread over the month, one exporter
# restart and one model change, each at an odd time of day.
LONG_EVENTS: Final = (
    (3 * DAY + 4 * HOUR + 11 * MINUTE + 7, RESTART),
    (7 * DAY + 14 * HOUR + 52 * MINUTE + 13, EXPORTER_RESTART),
    (11 * DAY + 17 * HOUR + 47 * MINUTE + 29, RESTART),
    (15 * DAY + 6 * HOUR + 19 * MINUTE + 41, MODEL_CHANGE),
    (19 * DAY + 9 * HOUR + 3 * MINUTE + 53, RESTART),
    (26 * DAY + 21 * HOUR + 29 * MINUTE + 17, RESTART),
)


def _steady_month(options: SimOptions) -> Built:
    events = _with_events(LONG_EVENTS, LONG_DAYS * DAY)
    rounds = outlier_rounds(
        events, options, _daily_outlier_aims(LONG_DAYS), clearance=OUTLIER_CLEARANCE
    )
    return Built(with_outliers(events, rounds, OUTLIER_FACTOR), rounds)


def _fixed(trace: Trace) -> Callable[[SimOptions], Built]:
    return lambda _: Built(trace)


# --- the scenarios -------------------------------------------------------------------------


def _drop_expected(
    *must: MustFire, may: Iterable[tuple[str, str]] = (), at: float = CHANGE_AT
) -> Expectations:
    return Expectations(must_fire=must, may_fire=frozenset(may), change_at=at, confirmations=True)


RECOVERY_AFTER: Final = 2 * HOUR
# From the first round back at full speed: the next round (an interval later) brings the
# median of the last three back, and keep_firing_for holds the alert 30 minutes more.
RESOLVE_WITHIN: Final = HOUR
STEADY: Final = Expectations()

SCENARIOS: Final[dict[str, Scenario]] = {
    s.name: s
    for s in (
        Scenario(
            "drop15_tg", "TG -15% at 8 h, lasting", 0.02,
            _drop_expected(MustFire(GENERATION, WARNING, 15 * MINUTE)),
            _fixed(_drop(0.85, tg=True, pp=False)),
        ),
        Scenario(
            "drop15_pp", "PP -15% at 8 h, lasting", 0.02,
            _drop_expected(MustFire(PROMPT, WARNING, 15 * MINUTE)),
            _fixed(_drop(0.85, tg=False, pp=True)),
        ),
        Scenario(
            "drop30", "TG and PP -30% at 8 h, lasting", 0.02,
            _drop_expected(
                MustFire(GENERATION, CRITICAL, 5 * MINUTE),
                MustFire(PROMPT, CRITICAL, 5 * MINUTE),
                may=[(GENERATION, WARNING), (PROMPT, WARNING)],
            ),
            _fixed(_drop(0.7, tg=True, pp=True)),
        ),
        Scenario(
            "drop25_cv6", "TG and PP -25% after 3 days, lasting, at 6% noise", 0.06,
            _drop_expected(
                MustFire(GENERATION, None, HOUR),
                MustFire(PROMPT, None, HOUR),
                may=[(a, s) for a in (GENERATION, PROMPT) for s in (WARNING, CRITICAL)],
                at=MATURE_CHANGE_AT,
            ),
            _fixed(_drop(0.75, tg=True, pp=True, at=MATURE_CHANGE_AT,
                         end=MATURE_CHANGE_AT + SHORT_END - CHANGE_AT)),
        ),
        Scenario(
            "drop25_cv6_young", "TG and PP -25% at 8 h, lasting, at 6% noise", 0.06,
            _drop_expected(
                MustFire(GENERATION, None, HOUR),
                MustFire(PROMPT, None, HOUR),
                may=[(a, s) for a in (GENERATION, PROMPT) for s in (WARNING, CRITICAL)],
            ),
            _fixed(_drop(0.75, tg=True, pp=True)),
        ),
        Scenario(
            "recovering_drop", "TG and PP -30% at 8 h for 2 h, then back", 0.02,
            dataclasses.replace(
                _drop_expected(
                    MustFire(GENERATION, CRITICAL, 5 * MINUTE, RESOLVE_WITHIN),
                    MustFire(PROMPT, CRITICAL, 5 * MINUTE, RESOLVE_WITHIN),
                    may=[(GENERATION, WARNING), (PROMPT, WARNING)],
                ),
                recovery_at=CHANGE_AT + RECOVERY_AFTER,
            ),
            _fixed(_drop(0.7, tg=True, pp=True, lasts=RECOVERY_AFTER, end=14 * HOUR)),
        ),
        Scenario(
            "steady_cv2_30d",
            "30 days at 2% noise; daily -40% single-round outlier, 4 llama-server restarts, "
            "an exporter restart, a model change",
            0.02, dataclasses.replace(STEADY, confirmations=True), _steady_month,
        ),
        Scenario(
            "steady_cv6_30d",
            "30 days at 6% noise; daily -40% single-round outlier, 4 llama-server restarts, "
            "an exporter restart, a model change",
            0.06, dataclasses.replace(STEADY, confirmations=True), _steady_month,
        ),
        Scenario(
            "restarts", "2 days, 4 llama-server restarts", 0.02, STEADY,
            _fixed(_with_events(
                [(t, RESTART) for t in (9 * HOUR + 787, 20 * HOUR + 2461, 31 * HOUR + 431,
                                        42 * HOUR + 1759)],
                2 * DAY,
            )),
        ),
        Scenario(
            "exporter_restart", "2 days, an exporter restart at 11 h", 0.02, STEADY,
            _fixed(_with_events([(11 * HOUR + 1411, EXPORTER_RESTART)], 2 * DAY)),
        ),
        Scenario(
            "model_change", "2 days, another model from 12 h on", 0.02, STEADY,
            _fixed(_with_events([(12 * HOUR + 2261, MODEL_CHANGE)], 2 * DAY)),
        ),
    )
}  # fmt: skip

# The longest first, so that a pool of workers finishes them together.
LONG_SCENARIOS: Final = ("steady_cv2_30d", "steady_cv6_30d")


def by_length(names: Iterable[str]) -> list[str]:
    """`names` with the long scenarios first."""
    return sorted(names, key=lambda n: n not in LONG_SCENARIOS)


# --- the run and its verdict ---------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    scenario: str
    seed: int
    days: float
    rounds: int
    confirmations: int
    round_starts: tuple[float, ...]
    outlier_rounds: tuple[float, ...]
    alerts: tuple[AlertEpisode, ...]  # the episodes that fired
    pending_only: tuple[AlertEpisode, ...]
    change_round: float | None  # the first round at or after the change
    recovery_round: float | None
    time_to_fire: dict[str, float | None]  # by MustFire.key: its first firing, from change_round
    resolved_after: dict[str, float | None]  # by MustFire.key: its last resolve, from recovery
    false_alerts: tuple[AlertEpisode, ...]
    problems: tuple[str, ...]
    real_seconds: float

    @property
    def confirmations_per_day(self) -> float:
        return self.confirmations / self.days


def first_round_at_or_after(round_starts: Sequence[float], t: float | None) -> float | None:
    if t is None:
        return None
    return next((s for s in round_starts if s >= t), None)


def _matches(episode: AlertEpisode, alert: str, severity: str | None) -> bool:
    return episode.name == alert and severity in (None, episode.severity)


# A round that starts this close before an exporter restart or the trace's end may be cut
# short (a round takes 13-25 s), and a run records only the rounds that finish.
CUT_SHORT_SECONDS: Final = MINUTE


def off_schedule(trace: Trace, preview: Sequence[float], ran: Sequence[float]) -> list[float]:
    """The rounds in which a run's scheduled round starts (`ran`) and its seed's schedule
    (`preview`, from `scheduled_round_starts`) disagree: rounds the run has and the schedule
    not, and rounds the schedule has and the run not, other than one an exporter restart or
    the end may have cut short. Empty for a run that followed its seed's schedule."""
    planned, done = set(preview), set(ran)
    cuts = (*trace.events(EXPORTER_RESTART), trace.end)
    missing = [
        t for t in planned - done if not any(0 <= cut - t < CUT_SHORT_SECONDS for cut in cuts)
    ]
    return sorted([*(done - planned), *missing])


def assess(
    scenario: Scenario,
    seed: int,
    built: Built,
    sim: SimResult,
    episodes: Sequence[AlertEpisode],
    *,
    preview: Sequence[float] | None = None,
    real_seconds: float = 0.0,
) -> Outcome:
    """The verdict on one run of `scenario`: the figures, and `problems`, one line per
    expectation it missed (none: it met them all). With `preview` (the seed's schedule), a
    run that did not follow it is a problem too: its figures are not the seed's."""
    expected = scenario.expected
    all_episodes = [e.since(sim.start_unix) for e in episodes]  # in trace seconds
    fired = tuple(e for e in all_episodes if e.fired_at is not None)
    starts = tuple(sim.round_starts)
    change_round = first_round_at_or_after(starts, expected.change_at)
    recovery_round = first_round_at_or_after(starts, expected.recovery_at)
    problems: list[str] = []
    if preview is not None and (strays := off_schedule(built.trace, preview, starts)):
        problems.append(f"the run left its seed's schedule at {strays[0]:.3f} s")

    def expected_alert(e: AlertEpisode) -> bool:
        after_change = change_round is not None and (e.fired_at or 0) >= change_round
        allowed = any(_matches(e, m.alert, m.severity) for m in expected.must_fire) or (
            (e.name, e.severity) in expected.may_fire
        )
        return after_change and allowed and all(e.labels.get(k) == v
                                                for k, v in TARGET_LABELS.items())  # fmt: skip

    false_alerts = tuple(e for e in fired if not expected_alert(e))
    problems += [f"false alert: {e.describe()}" for e in false_alerts]

    time_to_fire: dict[str, float | None] = {}
    resolved_after: dict[str, float | None] = {}
    for must in expected.must_fire:
        mine = [e for e in fired if _matches(e, must.alert, must.severity) and expected_alert(e)]
        first = min((e.fired_at for e in mine if e.fired_at is not None), default=None)
        took = None if first is None or change_round is None else first - change_round
        time_to_fire[must.key] = took
        if took is None:
            problems.append(f"{must.key} did not fire (change round {change_round})")
        elif took > must.within_s:
            problems.append(f"{must.key} fired {took:.0f} s after the change round, "
                            f"over {must.within_s:.0f} s")  # fmt: skip
        if must.resolve_within_s is None:
            continue
        ends = [e.resolved_at for e in mine]
        if not mine or recovery_round is None or None in ends:
            resolved_after[must.key] = None
            problems.append(f"{must.key} did not resolve after the recovery")
            continue
        last = max(t for t in ends if t is not None) - recovery_round
        resolved_after[must.key] = last
        if last > must.resolve_within_s:
            problems.append(f"{must.key} resolved {last:.0f} s after the recovery round, "
                            f"over {must.resolve_within_s:.0f} s")  # fmt: skip
    if expected.confirmations and sim.confirmations == 0:
        problems.append("no confirmation rounds")
    # Each outlier was placed on a scheduled round of an armed series (by the schedule's
    # preview): the run must have started that round then, and confirmed (refuted) the
    # outlier with at least one confirmation round.
    missed = [t for t in built.outlier_rounds if t not in starts]
    if missed:
        problems.append(f"outliers on no round of the run: {missed}")
    if sim.confirmations < len(built.outlier_rounds):
        problems.append(
            f"{sim.confirmations} confirmation rounds for {len(built.outlier_rounds)} outliers"
        )
    return Outcome(
        scenario=scenario.name, seed=seed, days=built.trace.end / DAY, rounds=sim.rounds,
        confirmations=sim.confirmations, round_starts=starts,
        outlier_rounds=built.outlier_rounds, alerts=fired,
        pending_only=tuple(e for e in all_episodes if e.fired_at is None),
        change_round=change_round, recovery_round=recovery_round, time_to_fire=time_to_fire,
        resolved_after=resolved_after, false_alerts=false_alerts, problems=tuple(problems),
        real_seconds=real_seconds,
    )  # fmt: skip


def run_scenario(name: str, seed: int, workdir: Path | None = None) -> Outcome:
    """Simulate scenario `name` with `seed` and assess it. Files go to `workdir`, kept, or to
    a temporary directory, removed. Needs promtool and prometheus on the PATH."""
    scenario = SCENARIOS[name]
    began = time.perf_counter()
    built = scenario.build(seed)
    made = workdir is None
    work = Path(tempfile.mkdtemp(prefix=f"alert-sim-{name}-")) if workdir is None else workdir
    options = scenario.options(seed)
    try:
        sim, episodes = simulate_alerts(built.trace, work, options)
    finally:
        if made:
            shutil.rmtree(work, ignore_errors=True)
    return assess(
        scenario, seed, built, sim, episodes,
        preview=scheduled_round_starts(built.trace, options),
        real_seconds=time.perf_counter() - began,
    )  # fmt: skip


def quiet_worker() -> None:
    """Logging for a process that runs scenarios: the exporter logs every round, and only what
    went wrong is worth a line."""
    exporter_log.configure("console", "error")
