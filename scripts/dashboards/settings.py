"""The regression alerts' settings, read from the rules that hold them
(deploy/prometheus/rules/alerts.yml): the speed dashboard colours its shares and words its
arming state by them, so that a dashboard built from this repository cannot disagree with
the alerts it explains."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import yaml

ALERTS = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "rules" / "alerts.yml"

WARNING_SHARE = "llama_speed:regression_threshold:ratio"
CRITICAL_SHARE = "llama_speed:regression_critical_threshold:ratio"
SPREAD_MULTIPLE = "llama_speed:regression_spread_multiple:ratio"
CRITICAL_SPREAD_MULTIPLE = "llama_speed:regression_critical_spread_multiple:ratio"
MIN_HISTORY_HOURS = "llama_speed:regression_min_history:hours"
# The exporter's own minimum (exporter/state/baseline.py, MIN_BAND_ROUNDS): no rule holds it,
# since the baseline gauges are simply absent below it.
MIN_BAND_ROUNDS = 12


def threshold(kind: str, critical: bool = False) -> str:
    """The per-series threshold recording rule: kind is prompt or generation."""
    level = "_critical" if critical else ""
    return f"target_model_ctx_depth:llama_speed_{kind}_regression{level}_threshold:ratio"


@functools.cache
def setting(name: str) -> float:
    """The constant a settings recording rule holds: its `vector(N)`."""
    for group in yaml.safe_load(ALERTS.read_text())["groups"]:
        for rule in group["rules"]:
            if rule.get("record") == name:
                found = re.fullmatch(r"vector\(\s*([0-9.]+)\s*\)", str(rule["expr"]).strip())
                if found is None:
                    raise ValueError(f"{name} in {ALERTS} is not a constant vector(N)")
                return float(found.group(1))
    raise ValueError(f"{name}: no such recording rule in {ALERTS}")


def min_history_hours() -> int:
    """Whole hours: the arming table names each hour still to go."""
    hours = setting(MIN_HISTORY_HOURS)
    if hours != int(hours) or hours < 1:
        raise ValueError(f"{MIN_HISTORY_HOURS} is {hours}: the dashboard expects whole hours")
    return int(hours)
