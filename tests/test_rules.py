"""The shipped Prometheus rules: promtool accepts them and their unit tests pass, every alert
carries what the person it wakes needs, and the rules only name metrics the exporter serves."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import run_promtool

ROOT = Path(__file__).parent.parent
PROMETHEUS = ROOT / "deploy" / "prometheus"
CONFIG = PROMETHEUS / "prometheus.yml"
RULE_FILES = [PROMETHEUS / "rules" / "recording.yml", PROMETHEUS / "rules" / "alerts.yml"]
TEST_FILES = sorted((PROMETHEUS / "tests").glob("*.yml"))
RUNBOOK = ROOT / "docs" / "runbook.md"
RUNBOOK_BASE_TEMPLATE = (
    '{{ with query "llama_speed:runbook_url:info" }}{{ . | first | label "url" }}{{ end }}'
)
RUNBOOK_URL = (
    "https://github.com/llama-speed-exporter/llama-speed-exporter/blob/main/docs/runbook.md"
)
GOLDEN = [ROOT / "tests" / "golden" / name for name in ("exposition.prom", "exposition_gpu.prom")]
# Dashboards and the end-to-end test query these by name: renaming one breaks them.
RECORDING_RULES = {
    f"target_model_ctx_depth:llama_speed_{kind}_tokens_per_second:{window}"
    for kind in ("prompt", "generation")
    for window in ("rate1h", "rate6h")
}
# The regression alerts' settings and per-series thresholds, which the speed dashboard draws.
REGRESSION_GROUP = "llama-speed-regression"
REGRESSION_SETTINGS = {
    "llama_speed:regression_threshold:ratio",
    "llama_speed:regression_critical_threshold:ratio",
    "llama_speed:regression_spread_multiple:ratio",
    "llama_speed:regression_critical_spread_multiple:ratio",
    "llama_speed:regression_min_history:hours",
}
REGRESSION_THRESHOLDS = {
    f"target_model_ctx_depth:llama_speed_{kind}_regression{level}_threshold:ratio"
    for kind in ("prompt", "generation")
    for level in ("", "_critical")
}
REGRESSION_ALERTS = {"LlamaSpeedGenerationRegression": "generation",
                     "LlamaSpeedPromptRegression": "prompt"}  # fmt: skip
SEVERITIES = {"warning", "critical"}
ABSENT_ALERT = "LlamaSpeedExporterAbsent"
ALERTMANAGER_CONFIG = ROOT / "deploy" / "compose" / "alertmanager" / "alertmanager.yml"


def groups(path: Path) -> list[dict[str, Any]]:
    loaded: list[dict[str, Any]] = yaml.safe_load(path.read_text())["groups"]
    return loaded


def rules() -> list[dict[str, Any]]:
    return [rule for path in RULE_FILES for group in groups(path) for rule in group["rules"]]


def alerts() -> list[dict[str, Any]]:
    return [rule for rule in rules() if "alert" in rule]


def recorded_names() -> set[str]:
    return {rule["record"] for rule in rules() if "record" in rule}


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def runbook_anchors() -> set[str]:
    anchors, in_code = set(), False
    for line in RUNBOOK.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code  # a `# comment` in a PromQL block is no heading
        elif not in_code and (match := re.match(r"#{1,6} (.+)", line)):
            anchors.add(github_anchor(match.group(1)))
    return anchors


def golden_metric_names() -> set[str]:
    names: set[str] = set()
    for path in GOLDEN:
        names |= set(re.findall(r"^(llama_speed_[a-z_]+)", path.read_text(), re.MULTILINE))
    return names


def alert_tests() -> list[dict[str, Any]]:
    return [
        case
        for path in TEST_FILES
        for group in yaml.safe_load(path.read_text())["tests"]
        for case in group.get("alert_rule_test", [])
    ]


@pytest.mark.prometheus
def test_promtool_checks_the_rule_files(promtool: str) -> None:
    run_promtool(promtool, "check", "rules", *map(str, RULE_FILES))


@pytest.mark.prometheus
def test_promtool_checks_the_example_config(promtool: str) -> None:
    # promtool resolves rule_files against the config's directory: run it from elsewhere.
    run_promtool(promtool, "check", "config", str(CONFIG))


def test_example_config_loads_both_rule_files() -> None:
    config = yaml.safe_load(CONFIG.read_text())
    loaded = {(CONFIG.parent / name).resolve() for name in config["rule_files"]}
    assert loaded == {path.resolve() for path in RULE_FILES}


def test_test_files_exist() -> None:
    assert [p.name for p in TEST_FILES] == [
        "availability_test.yml", "canary_test.yml", "probes_test.yml", "recording_test.yml",
        "regression_test.yml", "resources_test.yml",
    ]  # fmt: skip


@pytest.mark.prometheus
@pytest.mark.parametrize("path", TEST_FILES, ids=lambda p: p.name)
def test_promtool_unit_tests_pass(promtool: str, path: Path) -> None:
    run_promtool(promtool, "test", "rules", str(path))


def test_recording_rules_keep_their_names() -> None:
    names = {rule["record"] for rule in groups(RULE_FILES[0])[0]["rules"]}
    assert names == RECORDING_RULES
    (regression,) = [g for g in groups(RULE_FILES[1]) if g["name"] == REGRESSION_GROUP]
    recorded = [rule["record"] for rule in regression["rules"] if "record" in rule]
    assert set(recorded) == REGRESSION_SETTINGS | REGRESSION_THRESHOLDS
    # A group evaluates its rules in order: each rule reads only what was recorded before it
    # in this evaluation, so the settings come first and the thresholds before the alerts.
    kinds = ["alert" if "alert" in rule else "record" for rule in regression["rules"]]
    assert kinds == sorted(kinds, reverse=True), "recording rules after an alert"
    order = {name: i for i, name in enumerate(recorded)}
    assert max(order[n] for n in REGRESSION_SETTINGS) < min(order[n] for n in REGRESSION_THRESHOLDS)
    for name in recorded_names():
        assert re.fullmatch(r"[a-z_]+:[a-z_]+:[a-z0-9_]+", name), f"{name}: level:metric:operations"


def alert_id(alert: dict[str, Any]) -> str:
    return f"{alert['alert']}-{alert.get('labels', {}).get('severity')}"


@pytest.mark.parametrize("alert", alerts(), ids=alert_id)
def test_alert_has_severity_texts_and_a_runbook_section(alert: dict[str, Any]) -> None:
    assert alert.get("labels", {}).get("severity") in SEVERITIES
    annotations = alert.get("annotations", {})
    assert annotations.get("summary", "").strip()
    assert annotations.get("description", "").strip()
    # The address comes from the one setting (the unit tests check what it renders to); the
    # anchor names a section of the runbook.
    url = annotations.get("runbook_url", "")
    assert url.startswith(f"{RUNBOOK_BASE_TEMPLATE}#"), url
    assert url.partition("#")[2] in runbook_anchors(), f"{url}: no such heading in {RUNBOOK}"


def test_the_runbook_address_is_set_in_one_place() -> None:
    (setting,) = [
        rule for group in groups(RULE_FILES[1]) for rule in group["rules"]
        if rule.get("record") == "llama_speed:runbook_url:info"
    ]  # fmt: skip
    assert setting["labels"]["url"] == RUNBOOK_URL
    assert sum(path.read_text().count(RUNBOOK_URL) for path in RULE_FILES) == 1


def test_every_alert_is_unit_tested_firing_and_silent() -> None:
    cases = alert_tests()
    firing = {case["alertname"] for case in cases if case.get("exp_alerts")}
    silent = {case["alertname"] for case in cases if not case.get("exp_alerts")}
    names = {alert["alert"] for alert in alerts()}
    assert names - firing == set(), "alerts no promtool test sees firing"
    assert names - silent == set(), "alerts no promtool test sees silent"
    # An alert with a rule per severity: each rule is seen firing.
    fired = {
        (case["alertname"], expected["exp_labels"]["severity"])
        for case in cases
        for expected in case.get("exp_alerts") or []
    }
    rules_by_severity = {(alert["alert"], alert["labels"]["severity"]) for alert in alerts()}
    assert rules_by_severity - fired == set(), "alerting rules no promtool test sees firing"


def test_runbook_has_no_section_for_an_alert_that_does_not_exist() -> None:
    sections = {a for a in runbook_anchors() if a.startswith("llamaspeed")}
    assert sections == {str(alert["alert"]).lower() for alert in alerts()}


def test_rules_name_only_metrics_the_exporter_serves() -> None:
    text = "\n".join(path.read_text() for path in RULE_FILES)
    for name in sorted(recorded_names(), key=len, reverse=True):
        text = text.replace(name, "")
    named = set(re.findall(r"(?<![\w:])llama_speed_[a-z_]+", text))
    assert named, "no metric found: the pattern is broken"
    assert named - golden_metric_names() == set()


def test_only_the_absent_alert_names_the_job() -> None:
    naming = {
        str(rule.get("alert", rule.get("record"))) for rule in rules() if "job=" in rule["expr"]
    }
    assert naming == {ABSENT_ALERT}
    (absent,) = [alert for alert in alerts() if alert["alert"] == ABSENT_ALERT]
    jobs = set(re.findall(r'job="([^"]+)"', absent["expr"]))
    config = yaml.safe_load(CONFIG.read_text())
    assert jobs == {job["job_name"] for job in config["scrape_configs"]}


def test_every_alert_names_its_box_or_target() -> None:
    # Routing groups by instance and target, and inhibition matches on them: an alert
    # without either would group with, and be inhibited like, every other box's. The one
    # exception is the whole job missing from Prometheus' targets, which has no box.
    for case in alert_tests():
        for expected in case.get("exp_alerts") or []:
            labels = expected["exp_labels"]
            if case["alertname"] == ABSENT_ALERT and "instance" not in labels:
                assert labels == {"severity": "critical", "job": "llama-speed"}
                continue
            assert labels.get("target") or labels.get("instance"), (case["alertname"], labels)


def matcher(text: str) -> tuple[str, str, str]:
    """(label, operator, value) of an Alertmanager matcher such as `severity="warning"`."""
    found = re.fullmatch(r'\s*(\w+)\s*(=~|!~|!=|=)\s*"(.*)"\s*', text)
    assert found, f"unexpected matcher {text!r}"
    label, op, value = found.groups()
    return label, op, value


def matches(op: str, value: str, label_value: str) -> bool:
    """Whether a matcher accepts `label_value` (a missing label is the empty string);
    Alertmanager's regular expressions are anchored, like fullmatch."""
    if op in ("=~", "!~"):
        return (re.fullmatch(value, label_value) is not None) == (op == "=~")
    return (value == label_value) == (op == "=")


def test_inhibit_rules_never_match_across_boxes() -> None:
    config = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    alert_names = {str(alert["alert"]) for alert in alerts()}
    assert config["inhibit_rules"]
    for rule in config["inhibit_rules"]:
        # Deprecated in Alertmanager 0.22 and slated for removal: matchers only.
        assert set(rule) == {"source_matchers", "target_matchers", "equal"}, rule
        assert "instance" in rule["equal"], rule
        # Alertmanager counts two missing labels as equal: a source without an `equal`
        # label would inhibit every alert that lacks it too, on any box.
        matchers = [matcher(m) for m in rule["source_matchers"]]
        for label in rule["equal"]:
            assert any(
                name == label and not matches(op, value, "") for name, op, value in matchers
            ), (label, rule)
        # A source named by alertname names alerts that exist.
        for name, op, value in matchers:
            if name == "alertname" and op in ("=", "=~"):
                assert any(matches(op, value, alert) for alert in alert_names), rule
    assert "match" not in config["route"] and "match_re" not in config["route"]
    assert {"instance", "target"} <= set(config["route"]["group_by"])


def regression_rules() -> list[dict[str, Any]]:
    return [alert for alert in alerts() if alert["alert"] in REGRESSION_ALERTS]


def test_each_regression_alert_has_a_warning_and_a_critical_rule() -> None:
    found = sorted((a["alert"], a["labels"]["severity"]) for a in regression_rules())
    assert found == sorted((name, s) for name in REGRESSION_ALERTS for s in SEVERITIES)


@pytest.mark.parametrize("alert", regression_rules(), ids=alert_id)
def test_regression_rules_read_their_own_kind_and_arm_on_history(alert: dict[str, Any]) -> None:
    kind = REGRESSION_ALERTS[alert["alert"]]
    other = "prompt" if kind == "generation" else "generation"
    expr = " ".join(alert["expr"].split())
    assert f"llama_speed_{kind}_recent_tokens_per_second" in expr
    assert f"llama_speed_{kind}_baseline_tokens_per_second" in expr
    assert f"llama_speed_{other}_" not in expr, "a rule of one kind reads the other's series"
    # Armed per series, on its own kind's band, never on another series' history.
    assert (
        "and on (job, instance, target, model, ctx, depth)"
        f' llama_speed_baseline_history_seconds{{probe="{kind}"}}'
        " >= 3600 * scalar(llama_speed:regression_min_history:hours)"
    ) in expr
    level = "_critical" if alert["labels"]["severity"] == "critical" else ""
    threshold = f"target_model_ctx_depth:llama_speed_{kind}_regression{level}_threshold:ratio"
    assert f"< 1 - {threshold}" in expr
    # The warning also wants the latest round low; the critical the median of 3 alone.
    latest = f"( llama_speed_{kind}_tokens_per_second /"
    assert (latest in expr) == (alert["labels"]["severity"] == "warning")
    # Past the next scheduled round and its confirmations: a drop close to a threshold
    # does not page and resolve by turns.
    assert alert["keep_firing_for"] == "30m"


@pytest.mark.parametrize("alert", regression_rules(), ids=alert_id)
def test_regression_texts_say_what_window_a_figure_covers(alert: dict[str, Any]) -> None:
    # The page may arrive after speed is back: a median of the last rounds worded as the
    # current speed misleads. Both texts say what the figure covers, and the description
    # quotes the median, the latest round and the baseline, each from the alert's own series.
    summary, description = alert["annotations"]["summary"], alert["annotations"]["description"]
    assert "over its last rounds" in summary and "runs at" not in summary
    assert "The last rounds of" in description and "a median of" in description
    assert "the latest round" in description
    assert "(the median of its last 3 days of rounds)" in description
    kind = REGRESSION_ALERTS[alert["alert"]]
    for metric in ("recent_tokens_per_second", "tokens_per_second", "baseline_tokens_per_second"):
        query = f'llama_speed_{kind}_{metric}{{instance=%q,target=%q,model=%q,ctx=%q,depth=%q}}"'
        assert query in description, query
    # Alertmanager repeats these on resolve: the text says what a resolved one means.
    assert "a resolved notification means the last rounds are back" in " ".join(description.split())
