"""Each series' band, its verdicts and the confirmation state machine, with exact figures.

Every value here is worked out by hand: the band is the median of the rounds and 1.4826 x
their median absolute deviation, a round is out of band past max(2 spreads, 5% of the
median), and a series settles on a new verdict only once the confirmations agree.
"""

from __future__ import annotations

import json

import pytest

from exporter.probe.results import Kind
from exporter.state.baseline import (
    ABOVE_BAND,
    BACK_IN_BAND,
    BAND_WINDOW_SECONDS,
    BELOW_BAND,
    MAX_BAND_ROUNDS,
    MAX_SERIES,
    MIN_BAND_ROUNDS,
    Band,
    BandFigures,
    Baselines,
    SeriesKey,
)

T0 = 1_700_000_000.0  # a unix time; the rounds of a test follow it
STEP = 1200.0  # the default interval between rounds
FILE = "/models/a.gguf|Q8_0"
KEY = SeriesKey("t", "a", 4096, 0, "generation")


def band_of(values: list[float], start: float = T0) -> Band:
    band = Band(FILE)
    for i, value in enumerate(values):
        band.add(start + i * STEP, value)
    return band


def shown(figures: BandFigures | None) -> BandFigures:
    assert figures is not None, "the band shows no figures"
    return figures


class Series:
    """One series of a `Baselines`, fed rounds one interval apart."""

    def __init__(self, needed: int = 2, key: SeriesKey = KEY) -> None:
        self.baselines = Baselines()
        self.key = key
        self.needed = needed
        self.at = T0

    def round(self, value: float, *, confirmation: bool = False, file: str = FILE) -> str | None:
        """Record a round; the reason for a confirmation it asks for, or None."""
        _, reason = self.baselines.record(
            self.key, file, self.at, value, confirmation=confirmation, needed=self.needed
        )
        self.at += STEP
        return reason

    def confirm(self, value: float) -> str | None:
        return self.round(value, confirmation=True)

    def steady(self, value: float = 100.0, count: int = MIN_BAND_ROUNDS) -> None:
        for _ in range(count):
            assert self.round(value) is None

    @property
    def figures(self) -> BandFigures:
        figures = self.baselines.figures(self.key)
        assert figures is not None
        return figures


# Band figures


def test_median_and_spread_of_a_known_list() -> None:
    # Median (100 + 101) / 2; absolute deviations sorted 0.5 0.5 0.5 1.5 1.5 2.5 2.5 4.5 5.5
    # 9.5 10.5 99.5, whose median is 2.5: the 200 moves neither figure.
    values = [90.0, 95.0, 98.0, 99.0, 100.0, 100.0, 101.0, 102.0, 103.0, 105.0, 110.0, 200.0]
    figures = band_of(values).figures()
    assert figures is not None
    assert figures.median == 100.5
    assert figures.spread == pytest.approx(2.5 * 1.4826, abs=1e-12)
    assert figures.rounds == 12
    assert figures.history_seconds == 11 * STEP
    assert figures.recent == 110.0  # median of the last three: 105, 110, 200


def test_an_odd_count_has_the_middle_value_as_median() -> None:
    values = [float(v) for v in range(1, 14)]  # 1..13: median 7, deviations 0 1 1 2 2 .. 6 6
    figures = band_of(values).figures()
    assert figures is not None
    assert figures.median == 7.0
    assert figures.spread == pytest.approx(3.0 * 1.4826, abs=1e-12)


def test_no_band_below_twelve_rounds_but_recent_and_counts_from_the_first() -> None:
    band = band_of([100.0] * (MIN_BAND_ROUNDS - 1))
    figures = band.figures()
    assert figures is not None
    assert (figures.median, figures.spread) == (None, None)
    assert figures.rounds == MIN_BAND_ROUNDS - 1
    assert figures.recent == 100.0
    # Without a band nothing is out of it, however far off.
    assert band.verdict(1.0) == "within"
    assert band.verdict(1e9) == "within"
    band.add(T0 + 99 * STEP, 100.0)
    twelve = band.figures()
    assert twelve is not None
    assert (twelve.median, twelve.spread) == (100.0, 0.0)


def test_an_empty_band_has_no_figures() -> None:
    assert Band(FILE).figures() is None
    assert Baselines().figures(KEY) is None


def test_recent_is_the_median_of_the_last_three_rounds() -> None:
    assert shown(band_of([100.0]).figures()).recent == 100.0
    assert shown(band_of([100.0, 50.0]).figures()).recent == 75.0
    assert shown(band_of([1.0, 100.0, 50.0, 70.0]).figures()).recent == 70.0


# Verdicts


def test_a_quiet_series_is_judged_by_the_five_percent_floor() -> None:
    # Spread 0: the margin is 5% of 100.
    band = band_of([100.0] * 12)
    assert band.verdict(95.0) == "within"
    assert band.verdict(94.9) == "below"
    assert band.verdict(105.0) == "within"
    assert band.verdict(105.1) == "above"


def test_a_noisy_series_is_judged_by_two_spreads() -> None:
    # 90 and 110 six times each: median 100, every deviation 10, spread 14.826, and two
    # spreads (29.652) are more than 5% of the median.
    band = band_of([90.0, 110.0] * 6)
    margin = 2 * 1.4826 * 10
    assert band.verdict(100.0 - margin + 0.01) == "within"
    assert band.verdict(100.0 - margin - 0.01) == "below"
    assert band.verdict(100.0 + margin - 0.01) == "within"
    assert band.verdict(100.0 + margin + 0.01) == "above"
    assert band.verdict(80.0) == "within"  # past 5%, within two spreads


def test_a_round_is_judged_against_the_rounds_before_it() -> None:
    # The twelfth round is judged on eleven: no band yet, whatever its value.
    series = Series()
    series.steady(count=MIN_BAND_ROUNDS - 1)
    assert series.round(10.0) is None
    assert series.figures.rounds == MIN_BAND_ROUNDS


# The confirmation state machine


def test_a_drop_confirmed_twice_settles_below() -> None:
    series = Series(needed=2)
    series.steady()
    assert series.round(80.0) == BELOW_BAND
    assert series.confirm(80.0) == BELOW_BAND  # one agreed: one more is needed
    assert series.confirm(80.0) is None  # both agreed: settled on "below"
    # Settled: the same low speed at the next scheduled round asks for nothing.
    assert series.round(80.0) is None
    assert series.round(80.0) is None


def test_a_drop_settles_below_in_the_band_state() -> None:
    band = band_of([100.0] * 12)
    assert band.observe(band.verdict(80.0), 0.0, confirmation=False, needed=2) == BELOW_BAND
    assert (band.settled, band.confirming, band.agreed) == ("within", "below", 0)
    assert band.observe("below", 0.0, confirmation=True, needed=2) == BELOW_BAND
    assert (band.settled, band.confirming, band.agreed) == ("within", "below", 1)
    assert band.observe("below", 0.0, confirmation=True, needed=2) is None
    assert (band.settled, band.confirming, band.agreed) == ("below", None, 0)


def test_a_lone_outlier_ends_the_confirmation_and_changes_nothing() -> None:
    series = Series(needed=2)
    series.steady()
    assert series.round(80.0) == BELOW_BAND
    assert series.confirm(100.0) is None  # disagrees: the slow round was an outlier
    # Still settled on "within": a normal round asks nothing, another slow one asks again.
    assert series.round(100.0) is None
    assert series.round(80.0) == BELOW_BAND


def test_an_outlier_leaves_the_settled_verdict_in_the_band_state() -> None:
    band = band_of([100.0] * 12)
    band.observe("below", 0.0, confirmation=False, needed=2)
    assert band.observe("within", 0.0, confirmation=True, needed=2) is None
    assert (band.settled, band.confirming, band.agreed) == ("within", None, 0)


def test_a_confirmation_that_disagrees_after_one_agreed_still_settles_nothing() -> None:
    series = Series(needed=3)
    series.steady()
    assert series.round(80.0) == BELOW_BAND
    assert series.confirm(80.0) == BELOW_BAND
    assert series.confirm(100.0) is None
    assert series.round(100.0) is None  # never settled on "below"


def test_recovery_after_a_confirmed_drop_asks_back_in_band() -> None:
    series = Series(needed=2)
    series.steady()
    series.round(80.0)
    series.confirm(80.0)
    series.confirm(80.0)  # settled below
    # Band: twelve 100s and three 80s, median 100; 100 is within, which is news.
    assert series.round(100.0) == BACK_IN_BAND
    assert series.confirm(100.0) == BACK_IN_BAND
    assert series.confirm(100.0) is None  # settled within again
    assert series.round(100.0) is None


def test_a_rise_asks_above_band() -> None:
    series = Series(needed=2)
    series.steady()
    assert series.round(120.0) == ABOVE_BAND
    assert series.confirm(120.0) == ABOVE_BAND
    assert series.confirm(120.0) is None
    assert series.round(120.0) is None


def test_a_scheduled_round_during_a_confirmation_starts_it_afresh() -> None:
    # A confirmation that never ran (its round was skipped) leaves the series confirming;
    # the next scheduled round judges anew rather than counting as a confirmation.
    series = Series(needed=2)
    series.steady()
    assert series.round(80.0) == BELOW_BAND
    assert series.round(80.0) == BELOW_BAND
    assert series.confirm(80.0) == BELOW_BAND  # the first agreeing confirmation of the two
    assert series.confirm(80.0) is None


def test_needing_no_confirmation_settles_at_once_and_never_asks() -> None:
    series = Series(needed=0)
    series.steady()
    assert series.round(80.0) is None
    assert series.round(80.0) is None
    assert series.round(100.0) is None
    band = band_of([100.0] * 12)
    assert band.observe(band.verdict(80.0), 0.0, confirmation=False, needed=0) is None
    assert (band.settled, band.confirming) == ("below", None)


def test_a_confirmation_round_of_a_series_that_asked_nothing_is_ignored() -> None:
    # Another series of the same round asked for it: this one stays as it was.
    band = band_of([100.0] * 12)
    assert band.observe("below", 0.0, confirmation=True, needed=2) is None
    assert (band.settled, band.confirming, band.agreed) == ("within", None, 0)


def test_recent_moves_after_the_first_agreeing_confirmation() -> None:
    series = Series(needed=2)
    series.steady()
    series.round(80.0)
    assert series.figures.recent == 100.0  # 100, 100, 80
    series.confirm(80.0)
    assert series.figures.recent == 80.0  # 100, 80, 80


def test_recent_does_not_move_for_a_lone_outlier() -> None:
    series = Series(needed=2)
    series.steady()
    series.round(80.0)
    series.confirm(100.0)
    assert series.figures.recent == 100.0  # 100, 80, 100
    series.round(100.0)
    assert series.figures.recent == 100.0


def test_two_refuted_outliers_a_round_apart_never_make_a_median_of_three() -> None:
    # Each slow round is refuted by its confirmation; the next one must not pair with the
    # first to pull the median of the last three down.
    series = Series(needed=2)
    series.steady()
    series.round(80.0)
    series.confirm(100.0)
    assert series.round(80.0) == BELOW_BAND
    assert series.figures.recent == 100.0  # 100, 100, 80: the first 80 was refuted
    series.confirm(100.0)
    assert series.figures.recent == 100.0


def test_rounds_of_a_refuted_run_leave_recent_but_stay_in_the_band() -> None:
    series = Series(needed=2)
    series.steady()
    series.round(80.0)
    series.confirm(80.0)
    assert series.figures.recent == 80.0  # 100, 80, 80: two low rounds, the drop may be real
    series.confirm(100.0)  # the second confirmation disagrees: both were outliers
    assert series.figures.recent == 100.0
    assert series.figures.rounds == MIN_BAND_ROUNDS + 3


# Window and size


def test_rounds_older_than_the_window_leave_the_band() -> None:
    series = Series()
    series.round(50.0)
    series.at = T0 + BAND_WINDOW_SECONDS  # exactly the window after the first: still in
    series.round(100.0)
    assert series.figures.rounds == 2
    assert series.figures.history_seconds == BAND_WINDOW_SECONDS
    series.at = T0 + BAND_WINDOW_SECONDS + 1
    series.round(100.0)
    assert series.figures.rounds == 2
    assert series.figures.history_seconds == 1.0
    assert series.figures.recent == 100.0


def test_the_band_keeps_only_the_newest_rounds() -> None:
    # A round a minute: 300 of them fit in the window, so the count alone bounds the band.
    series = Series()
    for i in range(MAX_BAND_ROUNDS + 44):
        series.at = T0 + i * 60.0
        series.round(float(i + 1))
    figures = series.figures
    assert figures.rounds == MAX_BAND_ROUNDS
    assert figures.history_seconds == (MAX_BAND_ROUNDS - 1) * 60.0
    # The rounds kept are 45..300: their median is (172 + 173) / 2.
    assert figures.median == 172.5


def test_another_file_under_the_same_series_starts_afresh() -> None:
    series = Series()
    series.steady()
    series.round(100.0)
    assert series.round(50.0, file="/models/a.gguf|Q4_K_M") is None  # no band to judge by
    figures = series.figures
    assert (figures.rounds, figures.median, figures.recent) == (1, None, 50.0)
    # And back to the first file: that one is forgotten too.
    assert series.round(100.0) is None
    assert series.figures.rounds == 1


def test_the_verdict_state_resets_with_the_file() -> None:
    series = Series()
    series.steady()
    series.round(80.0)
    series.confirm(80.0)
    series.confirm(80.0)  # settled below
    for _ in range(MIN_BAND_ROUNDS):
        assert series.round(80.0, file="other") is None
    # Settled "within" on the new band: a round like its others asks nothing (still settled
    # "below", it would ask back_in_band).
    assert series.round(80.0, file="other") is None


# The registry


def key(i: int, kind: Kind = "generation") -> SeriesKey:
    return SeriesKey("t", f"model-{i}", 4096, 0, kind)


def test_the_least_recently_measured_series_goes_first_past_max_series() -> None:
    baselines = Baselines()
    for i in range(MAX_SERIES):
        baselines.record(key(i), FILE, T0 + i, 100.0, confirmation=False, needed=2)
    # Series 0 is measured again: series 1 is now the least recently measured.
    baselines.record(key(0), FILE, T0 + MAX_SERIES, 100.0, confirmation=False, needed=2)
    baselines.record(key(MAX_SERIES), FILE, T0 + MAX_SERIES + 1, 1.0, confirmation=False, needed=2)
    assert baselines.figures(key(1)) is None
    assert baselines.figures(key(0)) is not None
    assert baselines.figures(key(2)) is not None
    assert baselines.figures(key(MAX_SERIES)) is not None
    assert len(baselines.dump()) == MAX_SERIES
    baselines.record(
        key(MAX_SERIES + 1), FILE, T0 + MAX_SERIES + 2, 1.0, confirmation=False, needed=2
    )
    assert baselines.figures(key(2)) is None
    assert baselines.figures(key(0)) is not None


def test_series_not_measured_for_the_window_are_forgotten_when_another_starts() -> None:
    baselines = Baselines()
    baselines.record(key(0), FILE, T0, 100.0, confirmation=False, needed=2)
    baselines.record(key(1), FILE, T0 + 10, 100.0, confirmation=False, needed=2)
    later = T0 + BAND_WINDOW_SECONDS + 5
    baselines.record(key(2), FILE, later, 100.0, confirmation=False, needed=2)
    assert baselines.figures(key(0)) is None
    assert baselines.figures(key(1)) is not None  # its last round is inside the window
    assert baselines.figures(key(2)) is not None


def test_each_kind_and_depth_is_its_own_series() -> None:
    baselines = Baselines()
    baselines.record(key(0, "prompt"), FILE, T0, 1000.0, confirmation=False, needed=2)
    baselines.record(key(0, "generation"), FILE, T0, 100.0, confirmation=False, needed=2)
    deep = SeriesKey("t", "model-0", 4096, 4096, "generation")
    baselines.record(deep, FILE, T0, 50.0, confirmation=False, needed=2)
    assert shown(baselines.figures(key(0, "prompt"))).recent == 1000.0
    assert shown(baselines.figures(key(0, "generation"))).recent == 100.0
    assert shown(baselines.figures(deep)).recent == 50.0


def test_dump_then_load_restores_every_series_figures() -> None:
    baselines = Baselines()
    values = [90.0, 110.0] * 7
    for i, value in enumerate(values):
        at = T0 + i * STEP
        baselines.record(key(0), FILE, at, value, confirmation=False, needed=2)
        baselines.record(
            key(1, "prompt"), "other|Q4_0", at, value * 10, confirmation=False, needed=2
        )
    now = T0 + len(values) * STEP
    dumped = json.loads(json.dumps(baselines.dump()))  # as the state file holds it
    assert [entry["probe"] for entry in dumped] == ["generation", "prompt"]
    restored = Baselines()
    for entry in dumped:
        restored.load(
            SeriesKey(
                entry["target"], entry["model"], entry["ctx"], entry["depth"], entry["probe"]
            ),
            entry["file"],
            [(at, value) for at, value in entry["rounds"]],
            now,
        )
    for k in (key(0), key(1, "prompt")):
        assert restored.figures(k) == baselines.figures(k)
    assert restored.dump() == baselines.dump()
    figures = restored.figures(key(0))
    assert figures is not None
    assert (figures.median, figures.rounds) == (100.0, 14)
    assert figures.spread == pytest.approx(14.826, abs=1e-9)


def test_a_restored_band_judges_the_next_round_and_keeps_its_file() -> None:
    restored = Baselines()
    restored.load(KEY, FILE, [(T0 + i * STEP, 100.0) for i in range(12)], T0 + 12 * STEP)
    at = T0 + 12 * STEP
    _, reason = restored.record(KEY, FILE, at, 80.0, confirmation=False, needed=2)
    assert reason == BELOW_BAND
    # Another file under the same series: the restored band does not judge it.
    _, reason = restored.record(KEY, "other", at + STEP, 10.0, confirmation=False, needed=2)
    assert reason is None


def test_load_sorts_the_rounds_and_drops_those_past_the_window() -> None:
    restored = Baselines()
    now = T0 + BAND_WINDOW_SECONDS + 10 * STEP
    old = (T0, 1.0)  # outside the window at `now`
    rounds = [(now - i * 60.0, 100.0 + i) for i in range(5)]  # newest first
    restored.load(KEY, FILE, [*rounds, old], now)
    figures = restored.figures(KEY)
    assert figures is not None
    assert figures.rounds == 5
    assert figures.history_seconds == 4 * 60.0
    assert figures.recent == 101.0  # the newest three by time: 102, 101, 100


def test_load_keeps_only_the_newest_rounds() -> None:
    restored = Baselines()
    now = T0 + 10 * STEP
    rounds = [(now - i * 60.0, 100.0 + i) for i in range(MAX_BAND_ROUNDS + 4)]
    restored.load(KEY, FILE, rounds, now)
    figures = restored.figures(KEY)
    assert figures is not None
    assert figures.rounds == MAX_BAND_ROUNDS
    assert figures.history_seconds == (MAX_BAND_ROUNDS - 1) * 60.0
    # The newest 256 hold the values 100..355: median (227 + 228) / 2.
    assert figures.median == 227.5


def test_a_load_whose_rounds_have_all_expired_restores_nothing() -> None:
    restored = Baselines()
    restored.load(KEY, FILE, [(T0, 100.0)], T0 + BAND_WINDOW_SECONDS + 1)
    assert restored.figures(KEY) is None
    assert restored.dump() == []
