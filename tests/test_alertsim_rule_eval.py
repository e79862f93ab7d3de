"""The alert simulator's rule evaluation: a day of samples backfilled into a real Prometheus,
recording rules materialised by promtool layer by layer, and the alerts' pending, firing and
resolved times from Prometheus 2.42's state machine."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
import yaml
from alertsim.alert_states import LabelKey, parse_duration_ms, track_episodes
from alertsim.backfill import RecordingRule, dependency_layers
from alertsim.group_offset import group_name_for_offset, group_offset_ns, xxhash64
from alertsim.prometheus_server import PrometheusError
from alertsim.rule_eval import AlertEpisode, evaluate_rules

from tests.conftest import run_promtool

pytestmark = pytest.mark.prometheus

# Not a multiple of the evaluation interval or of promtool's 2-hour blocks, so the recording
# rules' evaluation times must be placed on purpose to meet the alerts'.
DATA_START = 1_700_000_000
MINUTES = 24 * 60
# The evaluations start an hour into the data, every minute, to its last sample.
EVAL_START_MINUTE = 60
# Minutes [first, last) in which target "a" is slow.
DIPS = [(300, 303), (600, 630), (900, 902), (903, 905), (1430, MINUTES)]

RULES = {
    "groups": [
        {
            "name": "settings",
            "rules": [{"record": "speed:threshold:ratio", "expr": "vector(0.5)"}],
        },
        {
            "name": "derived",
            "rules": [
                # NaN, and so never below 1, unless the threshold was recorded first.
                {
                    "record": "target:speed:relative",
                    "expr": "speed / 100 / scalar(speed:threshold:ratio)",
                }
            ],
        },
        {
            "name": "alerts",
            "rules": [
                {
                    "alert": "SpeedLow",
                    "expr": "target:speed:relative < 1",
                    "for": "5m",
                    "labels": {"severity": "warning"},
                },
                {"alert": "SpeedDip", "expr": "speed < 50"},
                {"alert": "SpeedDipKept", "expr": "speed < 50", "keep_firing_for": "3m"},
            ],
        },
    ]
}


def at(minute: int) -> float:
    return float(DATA_START + 60 * minute)


def write_samples(path: Path) -> None:
    """Gauge `speed`: 100 for targets a and b, 10 for a during DIPS; a sample a minute."""
    lines = ["# TYPE speed gauge"]
    for target in ("a", "b"):
        for minute in range(MINUTES):
            slow = target == "a" and any(first <= minute < last for first, last in DIPS)
            lines.append(f'speed{{target="{target}"}} {10 if slow else 100} {at(minute):.0f}')
    path.write_text("\n".join([*lines, "# EOF", ""]))


def episode(
    name: str, pending: int, fired: int | None, resolved: int | None, **labels: str
) -> AlertEpisode:
    return AlertEpisode(
        name=name,
        labels={"target": "a", **labels},
        pending_at=at(pending),
        fired_at=None if fired is None else at(fired),
        resolved_at=None if resolved is None else at(resolved),
    )


Evaluate = Callable[[Mapping[str, object]], list[AlertEpisode]]


@pytest.fixture(scope="module")
def evaluate(
    tmp_path_factory: pytest.TempPathFactory, prometheus_binary: str, promtool: str
) -> Evaluate:
    directory = tmp_path_factory.mktemp("rule-eval")
    samples = directory / "samples.om"
    write_samples(samples)

    def run(rules: Mapping[str, object]) -> list[AlertEpisode]:
        rule_file = directory / "rules.yml"
        rule_file.write_text(yaml.safe_dump(rules))
        return evaluate_rules(
            samples,
            [rule_file],
            start=at(EVAL_START_MINUTE),
            end=at(MINUTES - 1),
            eval_interval=60,
            workdir=directory / "work",
            prometheus=prometheus_binary,
            promtool=promtool,
        )

    return run


@pytest.fixture(scope="module")
def episodes(evaluate: Evaluate) -> list[AlertEpisode]:
    return evaluate(RULES)


def of(episodes: list[AlertEpisode], name: str) -> list[AlertEpisode]:
    return [e for e in episodes if e.name == name]


def test_an_alert_without_for_fires_when_first_seen_and_resolves_when_gone(
    episodes: list[AlertEpisode],
) -> None:
    assert of(episodes, "SpeedDip") == [
        episode("SpeedDip", 300, 300, 303),
        episode("SpeedDip", 600, 600, 630),
        episode("SpeedDip", 900, 900, 902),
        episode("SpeedDip", 903, 903, 905),
        episode("SpeedDip", 1430, 1430, None),  # still firing at the last evaluation
    ]


def test_an_alert_with_for_reads_layered_recording_rules_of_the_same_evaluation(
    episodes: list[AlertEpisode],
) -> None:
    # Pending at the dip's first minute: the recorded ratio of that very evaluation, computed
    # with the constant threshold recorded in the layer before it.
    assert of(episodes, "SpeedLow") == [
        episode("SpeedLow", 300, None, None, severity="warning"),  # 3 minutes < for: 5m
        episode("SpeedLow", 600, 605, 630, severity="warning"),
        episode("SpeedLow", 900, None, None, severity="warning"),
        episode("SpeedLow", 903, None, None, severity="warning"),
        episode("SpeedLow", 1430, 1435, None, severity="warning"),
    ]


def test_keep_firing_for_counts_from_the_first_evaluation_without_the_alert(
    episodes: list[AlertEpisode],
) -> None:
    assert of(episodes, "SpeedDipKept") == [
        episode("SpeedDipKept", 300, 300, 306),
        episode("SpeedDipKept", 600, 600, 633),
        # Back within keep_firing_for: the same episode, counted again from minute 905.
        episode("SpeedDipKept", 900, 900, 908),
        episode("SpeedDipKept", 1430, 1430, None),
    ]


def test_episodes_are_sorted_by_pending_time_then_name(episodes: list[AlertEpisode]) -> None:
    assert [(e.pending_at, e.name) for e in episodes] == sorted(
        (e.pending_at, e.name) for e in episodes
    )
    assert [e.name for e in episodes if e.pending_at == at(300)] == [
        "SpeedDip",
        "SpeedDipKept",
        "SpeedLow",
    ]


def test_a_failing_alert_query_raises_with_prometheus_error(evaluate: Evaluate) -> None:
    # Two series on each side of a one-to-one match: Prometheus refuses it at evaluation.
    rules = {"groups": [{"name": "g", "rules": [{"alert": "X", "expr": "speed + on() speed"}]}]}
    with pytest.raises(PrometheusError, match="duplicate series"):
        evaluate(rules)


def test_a_templated_alert_label_is_refused(evaluate: Evaluate) -> None:
    rule = {"alert": "X", "expr": "speed < 50", "labels": {"severity": "{{ $value }}"}}
    with pytest.raises(ValueError, match="templated labels"):
        evaluate({"groups": [{"name": "g", "rules": [rule]}]})


def test_recording_rules_are_layered_by_what_they_read() -> None:
    threshold = RecordingRule("x:threshold:ratio", "vector(0.1)")
    rate = RecordingRule("x:rate1h", "rate(x_total[1h])")
    median = RecordingRule("x:median7d", "quantile_over_time(0.5, x:rate1h[7d])")
    low = RecordingRule("x:low", "x:rate1h < x:median7d * (1 - scalar(x:threshold:ratio))")
    # A longer name that merely starts with a recorded one is no read of it.
    other = RecordingRule("x:rate1h_other", "x:rate1h_otherwise")
    assert dependency_layers([low, median, other, rate, threshold]) == [
        [other, rate, threshold],
        [median],
        [low],
    ]


def test_recording_rules_reading_each_other_are_refused() -> None:
    rules = [RecordingRule("a", "b + 1"), RecordingRule("b", "a + 1")]
    with pytest.raises(ValueError, match="cycle"):
        dependency_layers(rules)


@pytest.mark.parametrize(
    ("text", "ms"), [("0", 0), ("90s", 90_000), ("5m", 300_000), ("1h30m", 5_400_000)]
)
def test_durations_parse_as_prometheus_does(text: str, ms: int) -> None:
    assert parse_duration_ms(text) == ms


@pytest.mark.parametrize("text", ["", "5", "m", "1m1h", "1.5h"])
def test_malformed_durations_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration_ms(text)


def test_a_pending_alert_that_vanishes_is_dropped_unfired() -> None:
    seen = {(("a", "1"),)}
    evaluations = [(0, seen), (60_000, seen), (120_000, set()), (180_000, seen)]
    assert track_episodes("A", evaluations, hold_ms=120_000) == [
        AlertEpisode("A", {"a": "1"}, 0.0, None, None),
        AlertEpisode("A", {"a": "1"}, 180.0, None, None),
    ]


def test_keep_firing_for_resolves_when_the_real_rule_manager_does(
    tmp_path: Path, promtool: str
) -> None:
    # Seen at minutes 0 and 1, gone (stale) from minute 2: Prometheus keeps it firing through
    # minute 4 and resolves it at 5, 3 minutes after the first evaluation without it.
    rule = {"alert": "Kept", "expr": "x == 1", "keep_firing_for": "3m"}
    (tmp_path / "rules.yml").write_text(
        yaml.safe_dump({"groups": [{"name": "g", "rules": [rule]}]})
    )
    checks = [
        {"eval_time": "4m", "alertname": "Kept", "exp_alerts": [{"exp_labels": {}}]},
        {"eval_time": "5m", "alertname": "Kept", "exp_alerts": []},
    ]
    test = {"interval": "1m", "input_series": [{"series": "x", "values": "1 1 stale"}]}
    unit = {"rule_files": ["rules.yml"], "tests": [{**test, "alert_rule_test": checks}]}
    (tmp_path / "test.yml").write_text(yaml.safe_dump(unit))
    run_promtool(promtool, "test", "rules", str(tmp_path / "test.yml"))

    seen: set[LabelKey] = {()}
    evaluations = [(minute * 60_000, seen if minute < 2 else set()) for minute in range(7)]
    assert track_episodes("Kept", evaluations, hold_ms=0, keep_firing_for_ms=180_000) == [
        AlertEpisode("Kept", {}, 0.0, 0.0, 300.0)
    ]


def test_xxhash64_matches_reference_digests() -> None:
    assert xxhash64(b"") == 0xEF46DB3751D8E999
    assert xxhash64(b"a") == 0xD24EC4F1A98C6E5B
    assert xxhash64(b"Nobody inspects the spammish repetition") == 0xFBCEA83C8A378BF1


@pytest.mark.parametrize("interval_s", [15, 60, 3600, 86_400])
def test_group_name_gives_the_offset_asked_for(interval_s: int) -> None:
    interval_ns = interval_s * 10**9
    for offset_ns in (0, 20 * 10**9 % interval_ns, interval_ns - 1):
        name = group_name_for_offset(offset_ns, interval_ns)
        assert group_offset_ns(name, interval_ns) == offset_ns
