"""A real Prometheus, with the shipped rules, scraping the exporter that probes a real
llama-server: every dashboard query and every recording rule must return data.

The GPUs are the fake pynvml's two RTX 3060s (these machines have none), with the real
llama-server's pid as their process, so the memory dashboard's per-process and ceiling
panels have something to show; everything else is real.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from exporter.gpu.nvml import Nvml
from exporter.llama.server_process import free_port
from exporter.state.baseline import MIN_BAND_ROUNDS
from tests import fake_pynvml
from tests.conftest import StartServer
from tests.daemon_harness import fast_target, running_daemon

pytestmark = [pytest.mark.real_server, pytest.mark.prometheus]

ROOT = Path(__file__).parent.parent
RULES = sorted((ROOT / "deploy" / "prometheus" / "rules").glob("*.yml"))
DASHBOARDS = sorted((ROOT / "grafana" / "dashboards").glob("*.json"))
# Grafana's built-in variables, at values a short test run has data for.
BUILTINS = {"__range": "5m", "__rate_interval": "1m", "__interval": "15s", "__range_s": "300"}
# Seconds between the exporter's rounds here. The baseline gauges, and the regression
# thresholds the rules record from them, exist from a series' MIN_BAND_ROUNDS-th valid round
# on: the queries that read them wait for that many rounds, and the deadline allows a minute
# to start plus twice as long as those rounds take. The confirmation rounds stay off (their
# 90 s delay is longer than the interval): their counters stay at 0, which the bar gauge
# shows as "none". No series arms here (6 hours of band history); the arming table shows it.
INTERVAL_S = 3.0
DEADLINE_S = 60 + 2 * MIN_BAND_ROUNDS * INTERVAL_S


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])  # collapsed rows hold their panels


def dashboard_queries() -> list[tuple[str, str]]:
    queries = []
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        for panel in panels(board):
            for target in panel.get("targets", []):
                if target.get("expr"):
                    queries.append((f"{path.stem} / {panel.get('title')}", target["expr"]))
    return queries


def concrete(expr: str) -> str:
    """Template variables as Grafana would fill them with 'All' selected."""
    expr = re.sub(r'(\w+)\s*=~?\s*"\$\{?(\w+)(?::\w+)?\}?"', r'\1=~".*"', expr)
    return re.sub(r"\$\{?(\w+)(?::\w+)?\}?", lambda m: BUILTINS.get(m.group(1), ".*"), expr)


def recording_rules() -> list[str]:
    names = []
    for path in RULES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            names += [rule["record"] for rule in group["rules"] if "record" in rule]
    return names


@pytest.fixture
def prometheus(
    tmp_path: Path, prometheus_binary: str
) -> Iterator[tuple[Path, Callable[[int], str]]]:
    binary = prometheus_binary
    port = free_port()
    config = tmp_path / "prometheus.yml"
    proc: subprocess.Popen[bytes] | None = None
    log = (tmp_path / "prometheus.log").open("wb")

    def start(exporter_port: int) -> str:
        nonlocal proc
        config.write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "rule_files": [str(p) for p in RULES],
                    "scrape_configs": [
                        {
                            "job_name": "llama-speed",
                            "static_configs": [{"targets": [f"127.0.0.1:{exporter_port}"]}],
                        }
                    ],
                }
            )
        )
        proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=log,
        )  # fmt: skip
        return f"http://127.0.0.1:{port}"

    try:
        yield tmp_path, start
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
        log.close()


def query(base: str, expr: str) -> list[Any]:
    response = httpx.get(f"{base}/api/v1/query", params={"query": expr}, timeout=10)
    body = response.json()
    assert body.get("status") == "success", f"{expr}: {body.get('error')}"
    return list(body["data"]["result"])


def test_every_dashboard_query_and_recording_rule_returns_data(
    llama_server: StartServer, prometheus: tuple[Path, Callable[[int], str]]
) -> None:
    assert DASHBOARDS and RULES, "dashboards and rules must be shipped"
    server = llama_server("--metrics", "-np", "2")
    gpus = fake_pynvml.FakePynvml()
    for gpu in gpus.gpus:  # the fake cards' llama-server is the real one
        gpu.compute_processes = [fake_pynvml.FakeProcess(server.pid, 512 * 1024 * 1024)]
    target = fast_target("tiny", server.url, timeout=2.5, interval=INTERVAL_S, depths=(0, 512))
    tmp, start = prometheus
    with running_daemon([target], nvml=Nvml(gpus)) as (daemon, exporter):
        base = start(daemon.web.port)
        wanted = [(f"record {name}", name) for name in recording_rules()]
        wanted += [(where, concrete(expr)) for where, expr in dashboard_queries()]
        empty = wanted
        deadline = time.monotonic() + DEADLINE_S
        while empty and time.monotonic() < deadline:
            # While Prometheus starts it refuses connections, then answers with non-JSON text.
            with contextlib.suppress(httpx.TransportError, json.JSONDecodeError):
                empty = [(w, e) for w, e in empty if not query(base, e)]
            time.sleep(0.5)  # poll interval inside the deadline
        exposition = httpx.get(f"{exporter}/metrics").text
    log = (tmp / "prometheus.log").read_text()[-2000:]
    assert not empty, "queries without data:\n" + "\n".join(f"{w}: {e}" for w, e in empty) + log

    # Every metric a dashboard or rule names is one the exporter serves.
    exposed = set(re.findall(r"^(llama_speed_[a-z_]+)", exposition, re.MULTILINE))
    named: set[str] = set()
    for path in [*RULES, *DASHBOARDS]:
        named |= set(re.findall(r"(?<![:\w])(llama_speed_[a-z_]+)", path.read_text()))
    assert named - exposed == set()
