"""The shipped alerts against their acceptance criteria, on the alert simulator: each named
scenario of scripts/alertsim/scenarios.py runs through the real exporter's scheduling and
confirmation code and the real Prometheus (scripts/alert_sim.py), with a fixed seed.

At the default probe plan and interval: a sustained 15% TG or PP drop fires the regression
alert within 15 minutes of the first round that sees it, a 30% drop the critical one within
5 minutes; 30 days at 2% or 6% noise with daily single-round outliers, restarts and a model
change fire nothing; at 6% noise a 25% drop still fires. scripts/alert_sim_figures.py runs the
same scenarios over other seeds for docs/alerting.md.

The scenarios run in a pool of two processes, started once for the module with the ones the
selected tests need, longest first: the two 30-day ones take 2-3 minutes each, side by side,
the rest seconds.
"""

from __future__ import annotations

import multiprocessing
import random
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from types import ModuleType

import pytest
from alert_sim import SimOptions, scheduled_round_starts
from alertsim.alert_states import AlertEpisode
from alertsim.scenarios import (
    CRITICAL,
    GENERATION,
    HOUR,
    MINUTE,
    PROMPT,
    SCENARIOS,
    TARGET_LABELS,
    WARNING,
    Outcome,
    by_length,
    quiet_worker,
    run_scenario,
)
from alertsim.trace import EXPORTER_RESTART, TraceBuilder

pytestmark = pytest.mark.prometheus

# The figures run seeds from 1001 on: traces these tests have never seen.
SEED = 1
WORKERS = 2
# A run that has not finished by then hangs: far above the 2-3 minutes a 30-day one takes.
RUN_TIMEOUT_S = 1800

Outcomes = Callable[[str], Outcome]


def _scenarios_selected(session: pytest.Session, module: ModuleType) -> set[str]:
    """The scenarios the session's selected tests of this module run: each names its own in a
    `scenario` parameter."""
    names: set[str] = set()
    for item in session.items:
        if isinstance(item, pytest.Function) and item.module is module:
            callspec = getattr(item, "callspec", None)
            if callspec is not None and "scenario" in callspec.params:
                names.add(callspec.params["scenario"])
    return names


@pytest.fixture(scope="module")
def outcomes(
    request: pytest.FixtureRequest, promtool: str, prometheus_binary: str
) -> Iterator[Outcomes]:
    """Each selected scenario's outcome, by name, as its run in the pool finishes."""
    del promtool, prometheus_binary  # present: the simulation runs them from the PATH
    names = by_length(_scenarios_selected(request.session, request.module))
    # spawn: a fork of this process would copy the test runner's threads' locks mid-use.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(WORKERS, mp_context=context, initializer=quiet_worker) as pool:
        runs: dict[str, Future[Outcome]] = {n: pool.submit(run_scenario, n, SEED) for n in names}

        def outcome(name: str) -> Outcome:
            if name not in runs:  # a test that names its scenario other than by parameter
                runs[name] = pool.submit(run_scenario, name, SEED)
            return runs[name].result(timeout=RUN_TIMEOUT_S)

        try:
            yield outcome
        finally:
            for run in runs.values():
                run.cancel()


def _fired(outcome: Outcome, alert: str, severity: str | None = None) -> list[AlertEpisode]:
    return [e for e in outcome.alerts if e.name == alert and severity in (None, e.severity)]


def _assert_labels_name_the_series(episodes: list[AlertEpisode]) -> None:
    for e in episodes:
        assert {k: e.labels.get(k) for k in TARGET_LABELS} == TARGET_LABELS, e.describe()


def _assert_met(outcome: Outcome) -> None:
    assert not outcome.problems, "\n".join(outcome.problems)


# --- drops that must fire ------------------------------------------------------------------


@pytest.mark.parametrize(("scenario", "alert"), [("drop15_tg", GENERATION), ("drop15_pp", PROMPT)])
def test_a_15_percent_drop_fires_the_warning_within_15_minutes(
    outcomes: Outcomes, scenario: str, alert: str
) -> None:
    outcome = outcomes(scenario)
    _assert_met(outcome)
    assert outcome.change_round is not None
    assert {(e.name, e.severity) for e in outcome.alerts} == {(alert, WARNING)}
    warning = _fired(outcome, alert, WARNING)
    _assert_labels_name_the_series(warning)
    fired_at = min(e.fired_at for e in warning if e.fired_at is not None)
    assert outcome.change_round < fired_at <= outcome.change_round + 15 * MINUTE
    assert outcome.confirmations > 0  # the first low round was confirmed


@pytest.mark.parametrize("scenario", ["drop30"])
def test_a_30_percent_drop_fires_critical_within_5_minutes(
    outcomes: Outcomes, scenario: str
) -> None:
    outcome = outcomes(scenario)
    _assert_met(outcome)
    assert outcome.change_round is not None
    for alert in (GENERATION, PROMPT):
        critical = _fired(outcome, alert, CRITICAL)
        _assert_labels_name_the_series(critical)
        fired_at = min(e.fired_at for e in critical if e.fired_at is not None)
        assert outcome.change_round < fired_at <= outcome.change_round + 5 * MINUTE
    # The warning follows once three low rounds have held for its 5 minutes; nothing else.
    assert {(e.name, e.severity) for e in outcome.alerts} <= {
        (a, s) for a in (GENERATION, PROMPT) for s in (WARNING, CRITICAL)
    }
    assert outcome.confirmations > 0


@pytest.mark.parametrize("scenario", ["recovering_drop"])
def test_a_drop_that_recovers_fires_then_resolves_within_an_hour(
    outcomes: Outcomes, scenario: str
) -> None:
    outcome = outcomes(scenario)
    _assert_met(outcome)
    assert outcome.change_round is not None and outcome.recovery_round is not None
    for alert in (GENERATION, PROMPT):
        critical = _fired(outcome, alert, CRITICAL)
        assert critical
        assert min(e.fired_at for e in critical if e.fired_at is not None) <= (
            outcome.change_round + 5 * MINUTE
        )
        # Every episode of the alert, either severity, has ended an hour after the first
        # round back at full speed.
        for e in _fired(outcome, alert):
            assert e.resolved_at is not None, e.describe()
            assert e.resolved_at <= outcome.recovery_round + HOUR, e.describe()


@pytest.mark.parametrize("scenario", ["drop25_cv6"])
def test_a_25_percent_drop_fires_at_6_percent_noise(outcomes: Outcomes, scenario: str) -> None:
    outcome = outcomes(scenario)
    _assert_met(outcome)
    assert outcome.change_round is not None
    for alert in (GENERATION, PROMPT):
        fired = _fired(outcome, alert)
        _assert_labels_name_the_series(fired)
        assert min(e.fired_at for e in fired if e.fired_at is not None) <= (
            outcome.change_round + HOUR
        )


# --- what must fire nothing ----------------------------------------------------------------


@pytest.mark.parametrize("scenario", ["steady_cv2_30d", "steady_cv6_30d"])
def test_a_steady_month_with_outliers_and_restarts_fires_nothing(
    outcomes: Outcomes, scenario: str
) -> None:
    outcome = outcomes(scenario)
    _assert_met(outcome)
    assert outcome.days == 30
    assert outcome.alerts == ()
    # A daily outlier from the second day on, kept clear of the restarts and the model change.
    assert len(outcome.outlier_rounds) >= 27
    assert set(outcome.outlier_rounds) <= set(outcome.round_starts)
    assert outcome.confirmations >= len(outcome.outlier_rounds)


@pytest.mark.parametrize("scenario", ["restarts", "exporter_restart", "model_change"])
def test_restarts_and_a_model_change_fire_nothing(outcomes: Outcomes, scenario: str) -> None:
    outcome = outcomes(scenario)
    _assert_met(outcome)
    assert outcome.alerts == ()
    assert outcome.rounds >= 140  # two days at the default 1200 s interval


# --- the schedule's preview ----------------------------------------------------------------


@pytest.mark.parametrize("scenario", ["exporter_restart", "steady_cv2_30d"])
def test_the_schedule_preview_is_the_runs_schedule(outcomes: Outcomes, scenario: str) -> None:
    """`scheduled_round_starts` gives the times a run starts its scheduled rounds, exactly,
    across exporter restarts, llama-server restarts and 30 days of jitter: what places an
    outlier on one round and not on its confirmation 90 s later."""
    spec = SCENARIOS[scenario]
    trace = spec.build(SEED).trace
    assert trace.events(EXPORTER_RESTART)
    preview = scheduled_round_starts(trace, spec.options(SEED))
    ran = outcomes(scenario).round_starts
    assert set(ran) <= set(preview)
    # The preview's rounds the run has not: only one that an exporter restart or the end cut
    # short, which the run does not record.
    cut = (*trace.events(EXPORTER_RESTART), trace.end)
    for t in sorted(set(preview) - set(ran)):
        assert any(0 <= c - t < MINUTE for c in cut), f"the run has no round at {t}"


@pytest.fixture
def random_left_as_found() -> Iterator[None]:
    """The preview seeds `random`, as a run does; other tests get their state back."""
    state = random.getstate()
    yield
    random.setstate(state)


@pytest.mark.usefixtures("random_left_as_found")
def test_the_preview_replays_each_exporter_start_and_its_seed() -> None:
    trace = TraceBuilder().at(3 * HOUR + 77, event=EXPORTER_RESTART).build(6 * HOUR)
    starts = scheduled_round_starts(trace, SimOptions(seed=5))
    assert starts == scheduled_round_starts(trace, SimOptions(seed=5))
    assert starts != scheduled_round_starts(trace, SimOptions(seed=6))
    # The first round 1 to 6 s after each start, then one every 1200 s plus up to 10 s.
    assert 1 <= starts[0] <= 6
    restarted = next(t for t in starts if t > 3 * HOUR + 77)
    assert 3 * HOUR + 77 + 10 + 1 <= restarted <= 3 * HOUR + 77 + 10 + 6
