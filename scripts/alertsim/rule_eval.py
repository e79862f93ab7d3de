"""When the alerts of Prometheus rule files would have gone pending, fired and resolved over
samples given as an OpenMetrics file: the real promtool backfills the samples and the recording
rules, the real Prometheus evaluates every alert's expression, and alert_states replays
Prometheus' alerting state machine over the results."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import yaml

from alertsim.alert_states import AlertEpisode, LabelKey, parse_duration_ms, track_episodes
from alertsim.backfill import (
    RecordingRule,
    backfill_openmetrics,
    dependency_layers,
    move_blocks,
    record_layer,
    run_promtool,
)
from alertsim.prometheus_server import PrometheusError, PrometheusServer

__all__ = ["AlertEpisode", "AlertingRule", "evaluate_rules", "read_rule_files"]

# Below Prometheus' limit of 11,000 points per series in one range query.
_POINTS_PER_QUERY: Final = 10_000
# Written by Prometheus' rule manager, which does not run here: an expression reading them
# would silently see nothing.
_RULE_MANAGER_SERIES: Final = re.compile(r"\bALERTS(_FOR_STATE)?\b")
# A constant series recorded with the first layer, to check that promtool evaluated the rules
# exactly at the alerts' evaluation times.
_GRID_PROBE: Final = "alertsim_evaluation_grid_probe"


@dataclass(frozen=True)
class AlertingRule:
    alert: str
    expr: str
    hold_ms: int = 0
    keep_firing_for_ms: int = 0
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class _Grid:
    """The evaluation times start_ms + k * step_ms, k < count."""

    start_ms: int
    step_ms: int
    count: int

    def at(self, index: int) -> int:
        return self.start_ms + index * self.step_ms


def evaluate_rules(
    openmetrics: Path,
    rule_files: Sequence[Path],
    *,
    start: float,
    end: float,
    eval_interval: float,
    workdir: Path,
    prometheus: str = "prometheus",
    promtool: str = "promtool",
) -> list[AlertEpisode]:
    """The alert episodes of `rule_files` evaluated every `eval_interval` seconds from `start`
    to `end` (unix seconds; start and interval whole) over the samples in `openmetrics`.

    Recording rules are evaluated at the same times, before the alerts: an alert evaluated at
    t sees the recording rules' values of t. Sorted by (pending_at, name, labels).
    """
    grid = _grid(start, end, eval_interval)
    run_promtool(promtool, "check", "rules", *map(str, rule_files))
    recording, alerting = read_rule_files(rule_files)
    workdir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="rule-eval-", dir=workdir))
    data_dir = root / "tsdb"
    data_dir.mkdir()
    backfill_openmetrics(promtool, openmetrics, data_dir)
    server = PrometheusServer(prometheus, data_dir, root / "prometheus.log")
    try:
        server.start()
        _record_rules(server, promtool, recording, grid, root)
        episodes = _evaluate_alerts(server, alerting, grid)
    finally:
        server.stop()
    return sorted(episodes, key=lambda e: (e.pending_at, e.name, sorted(e.labels.items())))


def read_rule_files(paths: Sequence[Path]) -> tuple[list[RecordingRule], list[AlertingRule]]:
    """The recording and the alerting rules of `paths`, in file and group order."""
    recording: list[RecordingRule] = []
    alerting: list[AlertingRule] = []
    for path in paths:
        for group in (yaml.safe_load(path.read_text()) or {}).get("groups") or []:
            _check_group_supported(group, path)
            for rule in group.get("rules") or []:
                _check_no_rule_manager_series(rule, path)
                if "record" in rule:
                    recording.append(_recording_rule(rule))
                else:
                    alerting.append(_alerting_rule(rule, path))
    return recording, alerting


def _grid(start: float, end: float, eval_interval: float) -> _Grid:
    if not (float(start).is_integer() and float(eval_interval).is_integer()):
        raise ValueError("start and eval_interval must be whole seconds")
    if eval_interval <= 0 or end < start:
        raise ValueError(f"no evaluations from {start} to {end} every {eval_interval} s")
    step_ms = int(eval_interval) * 1000
    return _Grid(int(start) * 1000, step_ms, int((end - start) * 1000) // step_ms + 1)


def _record_rules(
    server: PrometheusServer,
    promtool: str,
    rules: Sequence[RecordingRule],
    grid: _Grid,
    root: Path,
) -> None:
    if not rules:
        return
    layers = dependency_layers(rules)
    layers[0] = [*layers[0], RecordingRule(_GRID_PROBE, "vector(1)")]
    for index, layer in enumerate(layers):
        blocks = record_layer(
            promtool,
            layer,
            url=server.url,
            start_s=grid.start_ms // 1000,
            end_s=grid.at(grid.count - 1) // 1000,
            interval_s=grid.step_ms // 1000,
            workdir=root / f"layer-{index}",
        )
        # Prometheus 2.42 reads blocks moved into its data directory only when it starts (or
        # a minute later): restarting is the one prompt and certain way.
        server.stop()
        move_blocks(blocks, data_dir=server.data_dir)
        server.start()
    _check_on_grid(server, grid)


def _check_on_grid(server: PrometheusServer, grid: _Grid) -> None:
    for index in (0, grid.count - 1):
        result = server.query(f"timestamp({_GRID_PROBE})", grid.at(index))
        seen = [float(sample["value"][1]) for sample in result]
        if seen != [grid.at(index) / 1000]:
            raise PrometheusError(
                f"promtool recorded the rules off the evaluation times: at {grid.at(index)} ms"
                f" the latest recorded sample is at {seen} s"
            )


def _evaluate_alerts(
    server: PrometheusServer, rules: Sequence[AlertingRule], grid: _Grid
) -> list[AlertEpisode]:
    # As many queries at once as there are cores: Prometheus evaluates each on one.
    with ThreadPoolExecutor(max_workers=len(os.sched_getaffinity(0))) as pool:
        per_rule = pool.map(lambda rule: _evaluate_alert(server, rule, grid), rules)
        return [episode for episodes in per_rule for episode in episodes]


def _evaluate_alert(
    server: PrometheusServer, rule: AlertingRule, grid: _Grid
) -> list[AlertEpisode]:
    present: dict[int, set[LabelKey]] = {}
    for series in _query_grid(server, rule.expr, grid):
        labels = _alert_labels(series["metric"], rule.labels)
        for timestamp, _ in series["values"]:
            index = round((float(timestamp) * 1000 - grid.start_ms) / grid.step_ms)
            if labels in present.setdefault(index, set()):
                # Prometheus fails such an evaluation, and the alert's state stays as it was.
                raise ValueError(
                    f"alert {rule.alert} has two series with labels {dict(labels)} at"
                    f" {grid.at(index) / 1000}: they differ only in __name__"
                )
            present[index].add(labels)
    evaluations = ((grid.at(i), present.get(i, set())) for i in range(grid.count))
    return track_episodes(
        rule.alert, evaluations, hold_ms=rule.hold_ms, keep_firing_for_ms=rule.keep_firing_for_ms
    )


def _query_grid(server: PrometheusServer, expr: str, grid: _Grid) -> Iterator[dict[str, Any]]:
    for first in range(0, grid.count, _POINTS_PER_QUERY):
        last = min(first + _POINTS_PER_QUERY, grid.count) - 1
        yield from server.query_range(expr, grid.at(first), grid.at(last), grid.step_ms)


def _alert_labels(metric: dict[str, str], rule_labels: dict[str, str]) -> LabelKey:
    labels = {k: v for k, v in metric.items() if k not in {"__name__", "alertname"}}
    labels.update(rule_labels)
    return tuple(sorted(labels.items()))


def _recording_rule(rule: dict[str, Any]) -> RecordingRule:
    labels = {str(k): str(v) for k, v in (rule.get("labels") or {}).items()}
    return RecordingRule(str(rule["record"]), str(rule["expr"]), labels)


def _alerting_rule(rule: dict[str, Any], path: Path) -> AlertingRule:
    labels = {str(k): str(v) for k, v in (rule.get("labels") or {}).items()}
    templated = sorted(k for k, v in labels.items() if "{{" in v)
    if templated:
        raise ValueError(
            f"{path}: alert {rule['alert']} has templated labels {templated}, which"
            " the simulation does not expand"
        )
    return AlertingRule(
        alert=str(rule["alert"]),
        expr=str(rule["expr"]),
        hold_ms=parse_duration_ms(str(rule.get("for", "0"))),
        keep_firing_for_ms=parse_duration_ms(str(rule.get("keep_firing_for", "0"))),
        labels=labels,
    )


def _check_group_supported(group: dict[str, Any], path: Path) -> None:
    # Every group is evaluated at eval_interval, and nothing caps its alerts.
    unsupported = sorted({"interval", "limit"} & group.keys())
    if unsupported:
        raise ValueError(f"{path}: group {group.get('name')} sets {unsupported}, unsupported")


def _check_no_rule_manager_series(rule: dict[str, Any], path: Path) -> None:
    if _RULE_MANAGER_SERIES.search(str(rule.get("expr", ""))):
        name = rule.get("alert", rule.get("record"))
        raise ValueError(f"{path}: rule {name} reads ALERTS, which the simulation does not write")
