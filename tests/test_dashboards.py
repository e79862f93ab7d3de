"""The Grafana dashboards and their provisioning, checked by structure (Grafana does not run
here): valid JSON, unique panel ids, units, a grid without overlaps, only the provisioned
datasource, the template variables, queries that parse, and no metric name that the exporter
(tests/golden) or the recording rules do not have.
"""

from __future__ import annotations

import functools
import importlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import run_promtool
from tests.test_rules import (
    RECORDING_RULES,
    REGRESSION_SETTINGS,
    REGRESSION_THRESHOLDS,
    recorded_names,
)

ROOT = Path(__file__).parent.parent
GRAFANA = ROOT / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
GENERATOR = "python scripts/gen_dashboards.py"
GOLDEN = [ROOT / "tests" / "golden" / name for name in ("exposition.prom", "exposition_gpu.prom")]

EXPECTED_UIDS = {
    "llama-speed-speed.json": "llama-speed-speed",
    "llama-speed-memory.json": "llama-speed-memory",
    "llama-speed-context-scaling.json": "llama-speed-context-scaling",
}
PROVISIONED_UID = "llama-speed-prometheus"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
ALLOWED_UIDS = {"${datasource}", PROVISIONED_UID}
# What the dashboards may query of the rules: the recorded speeds, and the regression alerts'
# settings and per-series thresholds (tests/test_rules.py pins their names).
KNOWN_RULES = RECORDING_RULES | REGRESSION_SETTINGS | REGRESSION_THRESHOLDS
ALERTS = ROOT / "deploy" / "prometheus" / "rules" / "alerts.yml"
VARIABLES = ("datasource", "instance", "target", "model", "ctx")
PANEL_TYPES = {"row", "text", "timeseries", "stat", "table", "bargauge"}
WITHOUT_QUERIES = {"row", "text"}
GRID_WIDTH = 24

METRIC = re.compile(r"(?<![:\w])llama_speed_[a-z_]+")
RULE = re.compile(r"[a-z_]+:llama_speed_[a-z_]+:[a-z0-9_]+")
SETTING = re.compile(r"(?<![\w:])llama_speed:[a-z_]+:[a-z0-9_]+")
# Grafana's variables as the "All" option and a short range fill them, for promtool.
BUILTINS = {"__range": "5m", "__rate_interval": "1m", "__interval": "15s", "__range_s": "300"}


@functools.cache
def load(path: Path) -> dict[str, Any]:
    board: dict[str, Any] = json.loads(path.read_text())
    return board


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in board.get("panels", []):
        yield panel
        yield from panel.get("panels", [])  # a collapsed row holds its panels


def data_panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in panels(board):
        if panel["type"] not in WITHOUT_QUERIES:
            yield panel


def variables(board: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in board.get("templating", {}).get("list", [])}


def variable_query(variable: dict[str, Any]) -> str:
    query = variable.get("query", "")
    return str(query.get("query", "") if isinstance(query, dict) else query)


def exprs(board: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel query and every query variable."""
    for panel in panels(board):
        for target in panel.get("targets", []):
            yield f"{panel['title']} / {target.get('refId')}", target.get("expr", "")
    for name, variable in variables(board).items():
        if variable["type"] == "query":
            yield f"variable {name}", variable_query(variable)


def panel_units(panel: dict[str, Any]) -> set[str]:
    config = panel.get("fieldConfig", {})
    units = {config.get("defaults", {}).get("unit", "")}
    for override in config.get("overrides", []):
        units |= {p["value"] for p in override["properties"] if p["id"] == "unit"}
    return units


def strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from strings(item)


def golden_names() -> set[str]:
    names: set[str] = set()
    for path in GOLDEN:
        names |= set(re.findall(r"^(llama_speed_[a-z_]+)", path.read_text(), re.MULTILINE))
    return names


def balanced(expr: str) -> bool:
    """Brackets pair up outside string literals, and every string literal ends."""
    pairs = {")": "(", "]": "[", "}": "{"}
    stack: list[str] = []
    quote = ""
    escaped = False
    for char in expr:
        if quote:
            if escaped:
                escaped = False
            elif char == "\\" and quote != "`":
                escaped = True
            elif char == quote:
                quote = ""
        elif char in "\"'`":
            quote = char
        elif char in "([{":
            stack.append(char)
        elif char in pairs and (not stack or stack.pop() != pairs[char]):
            return False
    return not stack and not quote


def concrete(expr: str) -> str:
    """The query as Grafana sends it with every variable at 'All'."""
    expr = re.sub(r'(\w+)\s*=~?\s*"\$\{?(\w+)(?::\w+)?\}?"', r'\1=~".*"', expr)
    return re.sub(r"\$\{?(\w+)(?::\w+)?\}?", lambda m: BUILTINS.get(m.group(1), ".*"), expr)


def rect(panel: dict[str, Any]) -> tuple[int, int, int, int]:
    grid = panel["gridPos"]
    return grid["x"], grid["y"], grid["w"], grid["h"]


def overlap(a: dict[str, Any], b: dict[str, Any]) -> bool:
    ax, ay, aw, ah = rect(a)
    bx, by, bw, bh = rect(b)
    return ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah


boards = pytest.mark.parametrize("path", DASHBOARDS, ids=[p.name for p in DASHBOARDS])


def test_the_three_dashboards_ship_with_fixed_uids() -> None:
    assert {p.name for p in DASHBOARDS} == set(EXPECTED_UIDS)
    for path in DASHBOARDS:
        assert load(path)["uid"] == EXPECTED_UIDS[path.name]


def test_the_dashboards_are_what_the_generator_writes() -> None:
    """The JSON is built by scripts/dashboards/ with Grafana's SDK (a dev dependency): a hand
    edit, or a change to the code without the JSON, fails here."""
    generated: dict[Path, str] = importlib.import_module("gen_dashboards").generated()
    assert sorted(p.name for p in generated) == [p.name for p in DASHBOARDS], f"run {GENERATOR}"
    stale = [p.name for p, text in generated.items() if p.read_text(encoding="utf-8") != text]
    assert not stale, f"not what the generator writes: {stale}; run {GENERATOR}"


@boards
def test_dashboard_is_valid_json_with_its_metadata(path: Path) -> None:
    board = json.loads(path.read_text())
    assert board["title"].startswith("llama-speed / ")
    assert "llama-speed" in board["tags"]
    assert 36 <= board["schemaVersion"] <= 41
    assert board["panels"]
    assert board.get("id") is None  # provisioned: Grafana assigns the id
    for panel in panels(board):
        assert panel["type"] in PANEL_TYPES, panel["title"]
        assert panel.get("title"), panel


@boards
def test_panel_ids_are_unique_including_collapsed_rows(path: Path) -> None:
    ids = [panel["id"] for panel in panels(load(path))]
    assert all(isinstance(i, int) for i in ids)
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)


@boards
def test_every_panel_with_queries_has_a_unit(path: Path) -> None:
    for panel in data_panels(load(path)):
        assert panel.get("targets"), panel["title"]
        unit = panel["fieldConfig"]["defaults"].get("unit")
        assert unit, f"{panel['title']}: no unit"
        assert unit != "short", f"{panel['title']}: 'short' says nothing"


@boards
def test_speeds_are_shown_in_tokens_per_second(path: Path) -> None:
    """A panel that shows a speed itself (not a ratio of speeds) says tok/s."""
    for panel in data_panels(load(path)):
        speeds = [
            t["expr"]
            for t in panel["targets"]
            if "_tokens_per_second" in t["expr"] and "/" not in t["expr"]
        ]
        if speeds:
            assert any("tok/s" in unit for unit in panel_units(panel)), panel["title"]


@boards
def test_grid_positions_fit_and_do_not_overlap(path: Path) -> None:
    board = load(path)
    for panel in panels(board):
        x, y, w, h = rect(panel)
        assert all(isinstance(v, int) for v in (x, y, w, h)), panel["title"]
        assert x >= 0 and y >= 0 and w >= 1 and h >= 1, panel["title"]
        assert x + w <= GRID_WIDTH, panel["title"]
    top = board["panels"]
    groups = [top] + [row["panels"] for row in top if row["type"] == "row" and row["collapsed"]]
    for group in groups:
        for i, a in enumerate(group):
            for b in group[i + 1 :]:
                assert not overlap(a, b), f"{a['title']!r} overlaps {b['title']!r}"
    for row in (p for p in top if p["type"] == "row"):
        assert rect(row)[::2] == (0, GRID_WIDTH), row["title"]  # x 0, full width
        if row["collapsed"]:
            assert row["panels"], f"collapsed row {row['title']!r} holds nothing"
            assert all(rect(p)[1] > rect(row)[1] for p in row["panels"]), row["title"]
        else:
            assert row.get("panels", []) == [], f"expanded row {row['title']!r} holds panels"


@boards
def test_rows_group_the_panels(path: Path) -> None:
    top = load(path)["panels"]
    assert top[0]["type"] == "row", "the first panel is a row"
    assert sum(p["type"] == "row" for p in top) >= 2


def datasource_refs(node: Any) -> Iterator[Any]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource":
                yield value
            yield from datasource_refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from datasource_refs(item)


@boards
def test_only_the_datasource_variable_or_the_provisioned_uid(path: Path) -> None:
    board = load(path)
    for ref in datasource_refs(board):
        uid = ref.get("uid") if isinstance(ref, dict) else ref
        assert uid in ALLOWED_UIDS, f"hard-coded datasource {ref!r}"
    for panel in data_panels(board):
        assert panel["datasource"] == DATASOURCE, panel["title"]
        for target in panel["targets"]:
            assert target.get("datasource", DATASOURCE) == DATASOURCE, panel["title"]
    uids = re.findall(r'"uid":\s*"([^"]*)"', path.read_text())
    assert set(uids) - ALLOWED_UIDS == {EXPECTED_UIDS[path.name]}


@boards
def test_template_variables_chain_from_server_info(path: Path) -> None:
    found = variables(load(path))
    assert set(VARIABLES) <= set(found)
    ds = found["datasource"]
    assert ds["type"] == "datasource"
    assert ds["query"] == "prometheus"
    assert ds["current"]["value"] == PROVISIONED_UID
    for i, name in enumerate(VARIABLES[1:]):
        variable = found[name]
        query = variable_query(variable)
        assert variable["type"] == "query", name
        assert variable["datasource"] == DATASOURCE, name
        assert variable["multi"] and variable["includeAll"], name
        assert variable.get("allValue") == ".*", name  # matches series without the label too
        assert query.startswith("label_values(llama_speed_server_info"), query
        assert query.endswith(f", {name})"), query
        for earlier in VARIABLES[1 : i + 1]:  # chained: each filters by the ones before it
            assert f'{earlier}=~"${earlier}"' in query, (name, earlier)


@boards
def test_every_query_is_balanced_and_refids_are_unique(path: Path) -> None:
    board = load(path)
    for where, expr in exprs(board):
        assert expr.strip(), f"{where}: empty query"
        assert balanced(expr), f"{where}: unbalanced brackets or quotes in {expr!r}"
    for panel in data_panels(board):
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]


@boards
def test_every_metric_exists_in_the_golden_exposition_or_the_rules(path: Path) -> None:
    known = golden_names()
    assert "llama_speed_probes_skipped_total" in known  # the goldens were read
    for where, expr in exprs(load(path)):
        for name in METRIC.findall(expr):
            assert name in known, f"{where}: {name} is not in tests/golden"
        for name in RULE.findall(expr) + SETTING.findall(expr):
            assert name in KNOWN_RULES, f"{where}: {name} is not a recording rule"
    # Descriptions and empty-panel texts name metrics and rules too: none that does not exist.
    text = " ".join(strings(load(path)))
    assert set(METRIC.findall(text)) - known == set()
    assert set(RULE.findall(text) + SETTING.findall(text)) - KNOWN_RULES == set()
    assert recorded_names() >= KNOWN_RULES


def speed_panel(title: str) -> dict[str, Any]:
    (panel,) = [p for p in panels(load(GRAFANA / "dashboards" / "llama-speed-speed.json"))
                if p["title"] == title]  # fmt: skip
    return panel


def queries(panel: dict[str, Any]) -> dict[str, str]:
    return {t["refId"]: " ".join(t["expr"].split()) for t in panel["targets"]}


def test_the_speed_graphs_draw_the_exporters_baseline_and_the_warning_line() -> None:
    text = "".join(p.read_text() for p in DASHBOARDS)
    assert "baseline7d" not in text, "the 7-day recording rules are gone"
    for title, kind in (
        ("Prompt processing (PP)", "prompt"),
        ("Token generation (TG)", "generation"),
    ):
        found = queries(speed_panel(title))
        assert found["A"].startswith(f"llama_speed_{kind}_tokens_per_second{{")
        assert found["B"].startswith(
            f"target_model_ctx_depth:llama_speed_{kind}_tokens_per_second:rate1h{{"
        )
        assert found["C"].startswith(f"llama_speed_{kind}_baseline_tokens_per_second{{")
        # The line the latest round must fall under for the warning: the series' own
        # threshold, which is the configured share or its noise, whichever is larger.
        threshold = f"target_model_ctx_depth:llama_speed_{kind}_regression_threshold:ratio{{"
        assert found["D"].startswith(f"llama_speed_{kind}_baseline_tokens_per_second{{")
        assert f"* (1 - {threshold}" in found["D"]


def rule_setting(name: str) -> float:
    """The constant of a regression setting in the shipped rules."""
    exprs = [
        str(rule["expr"])
        for group in yaml.safe_load(ALERTS.read_text())["groups"]
        for rule in group["rules"]
        if rule.get("record") == name
    ]
    (found,) = [re.fullmatch(r"vector\(([0-9.]+)\)", e.strip()) for e in exprs]
    assert found, exprs
    return float(found.group(1))


def test_share_of_baseline_compares_what_the_alerts_compare() -> None:
    warning = 1 - rule_setting("llama_speed:regression_threshold:ratio")
    critical = 1 - rule_setting("llama_speed:regression_critical_threshold:ratio")
    for title, kind in (("PP: % of baseline", "prompt"), ("TG: % of baseline", "generation")):
        panel = speed_panel(title)
        (query,) = queries(panel).values()
        recent, _, baseline = query.partition(" / ")
        assert recent.startswith(f"llama_speed_{kind}_recent_tokens_per_second{{"), query
        assert baseline.startswith(f"llama_speed_{kind}_baseline_tokens_per_second{{"), query
        # Coloured at the alerts' shares, which the description names.
        assert steps(panel) == [("red", None), ("orange", pytest.approx(critical)),
                                ("green", pytest.approx(warning))]  # fmt: skip
        assert f"below {warning:.0%}" in panel["description"]
        assert f"below {critical:.0%}" in panel["description"]


def test_the_arming_table_words_each_state() -> None:
    panel = speed_panel("Regression alerting armed")
    hours = int(rule_setting("llama_speed:regression_min_history:hours"))
    state = queries(panel)["A"]
    assert "llama_speed_baseline_history_seconds{" in state
    assert "clamp_max(floor(" in state and f"/ 3600), {hours})" in state
    assert "llama_speed_baseline_rounds{" in state and ">= 12" in state
    (override,) = [o for o in panel["fieldConfig"]["overrides"]
                   if o["matcher"]["options"] == "Regression alerts"]  # fmt: skip
    (mappings,) = [p["value"] for p in override["properties"] if p["id"] == "mappings"]
    words = {value: result["text"] for m in mappings for value, result in m["options"].items()}
    assert words[str(hours)] == "armed"
    assert words["2"] == f"arming: 2 h of {hours} h"
    assert words["-5"] == "no baseline: 7 of 12 rounds"
    # Every figure the query can give is worded: -12..-1 before a baseline, 0..hours after.
    assert set(words) == {str(v) for v in range(-12, hours + 1)}
    index = [result["index"] for m in mappings for result in m["options"].values()]
    assert sorted(index) == list(range(len(index)))


def test_confirmation_rounds_are_shown_by_reason() -> None:
    (query,) = queries(speed_panel("Confirmation rounds by reason (time range)")).values()
    assert "increase(llama_speed_probe_confirmations_total{" in query
    assert "sum by (target, reason)" in query


@boards
def test_empty_panels_say_why(path: Path) -> None:
    for panel in data_panels(load(path)):
        no_value = panel["fieldConfig"]["defaults"].get("noValue", "")
        assert no_value, f"{panel['title']}: no noValue text"
        queries = [t["expr"] for t in panel["targets"]]
        if all("llama_speed_gpu_" in q for q in queries):
            assert "NVML" in no_value or "--collector.gpu" in no_value, panel["title"]
        kv = re.compile(r"llama_speed_kv_cache_(?!errors)")
        if all(kv.search(q) for q in queries):
            assert "llama_speed_kv_cache_errors_total" in no_value, panel["title"]


def steps(panel: dict[str, Any]) -> list[tuple[str, float | None]]:
    thresholds = panel["fieldConfig"]["defaults"].get("thresholds", {"steps": []})
    return [(s["color"], s["value"]) for s in thresholds["steps"]]


@boards
def test_thresholds_start_at_the_base_and_rise(path: Path) -> None:
    for panel in data_panels(load(path)):
        found = steps(panel)
        assert found, panel["title"]
        assert found[0][1] is None, panel["title"]
        values = [v for _, v in found[1:]]
        assert all(isinstance(v, int | float) for v in values), panel["title"]
        rising = [v for v in values if v is not None]  # none is, as asserted: for the type
        assert rising == sorted(rising), panel["title"]


def titled(fragment: str) -> list[dict[str, Any]]:
    found = [p for path in DASHBOARDS for p in panels(load(path)) if fragment in p["title"]]
    assert found, fragment
    return found


def test_thresholds_say_what_is_bad() -> None:
    for title in ("Probe success", "Server up", "GPU up"):
        for panel in titled(title):
            assert steps(panel) == [("red", None), ("green", 1)], title
    for panel in [*titled("VRAM used per GPU"), *titled("share of each GPU")]:
        assert steps(panel) == [("green", None), ("orange", 0.9), ("red", 0.95)]
    for panel in titled("% of baseline"):
        assert steps(panel)[0] == ("red", None)


@boards
def test_table_queries_are_instant(path: Path) -> None:
    for panel in data_panels(load(path)):
        if panel["type"] != "table":
            continue
        transformations = [t["id"] for t in panel.get("transformations", [])]
        assert "merge" in transformations or "joinByField" in transformations, panel["title"]
        for target in panel["targets"]:
            assert target["instant"] and not target["range"], panel["title"]
            if target["format"] != "table":  # a series per GPU, made into columns
                assert "labelsToFields" in transformations, panel["title"]


def test_context_scaling_reads_like_the_owners_report() -> None:
    board = load(GRAFANA / "dashboards" / "llama-speed-context-scaling.json")
    tables = [p for p in panels(board) if p["type"] == "table"]
    assert len(tables) == 1
    table = tables[0]
    queries = "\n".join(t["expr"] for t in table["targets"])
    for metric in (
        "llama_speed_prompt_tokens_per_second",
        "llama_speed_generation_tokens_per_second",
        "llama_speed_gpu_process_memory_used_bytes",
        "llama_speed_kv_cache_capacity_bytes",
        "llama_speed_server_info",
    ):
        assert metric in queries, metric
    renames: dict[str, str] = {}
    for step in table["transformations"]:
        renames |= step["options"].get("renameByName", {})
    columns = set(renames.values())
    assert {"Context", "Model", "Quant", "Depth", "PP", "TG", "Total VRAM", "KV cache"} <= columns
    per_gpu = [t for t in table["transformations"] if t["id"] == "renameByRegex"]
    assert per_gpu and per_gpu[0]["options"]["renamePattern"] == "GPU$1 VRAM"
    bars = {p["title"] for p in panels(board) if p["type"] == "bargauge"}
    assert {"PP against depth", "TG against depth"} <= bars


@pytest.mark.prometheus
def test_every_query_parses_with_promtool(tmp_path: Path, promtool: str) -> None:
    queries = [(where, concrete(e)) for path in DASHBOARDS for where, e in exprs(load(path))]
    rules = [
        {"record": f"dashboard:query:q{i}", "expr": expr}
        for i, (_, expr) in enumerate(queries)
        if not expr.startswith("label_values(")  # Grafana's function, not PromQL
    ]
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    output = run_promtool(promtool, "check", "rules", str(path))
    assert f"SUCCESS: {len(rules)} rules found" in output


def test_datasource_provisioning() -> None:
    config = yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    assert config["apiVersion"] == 1
    (datasource,) = config["datasources"]
    assert datasource["uid"] == PROVISIONED_UID
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    assert datasource["access"] == "proxy"
    assert datasource["isDefault"] is True
    assert datasource["name"]


def test_dashboard_provisioning() -> None:
    config = yaml.safe_load(
        (GRAFANA / "provisioning" / "dashboards" / "llama-speed.yml").read_text()
    )
    assert config["apiVersion"] == 1
    (provider,) = config["providers"]
    assert provider["type"] == "file"
    assert provider["folder"] == "llama-speed"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards/llama-speed"
    assert provider["name"]
