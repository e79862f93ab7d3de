"""A regression paged end to end with real parts: the real daemon probing a server that slowed,
a real Prometheus evaluating the shipped rules over what it scrapes, and a real Alertmanager
with the shipped config delivering to a webhook.

The series' history is the exporter's own: its band, read back from the state file
(`--storage.path`) as after a restart, spans seven hours of rounds, so the alerts are armed from
the first scrape; a fresh Prometheus needs no history of its own. The server then generates at
half its usual speed: the first round falls below the band, its confirmation agrees, the median
of the last three rounds drops, and the critical LlamaSpeedGenerationRegression fires at the next
evaluation (it needs no `for`). The warning needs five minutes and is not waited for here; its
timing is the promtool tests' and the simulator's (docs/alerting.md).
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from exporter.llama.server_process import free_port
from exporter.state.storage import FILE_NAME
from tests.daemon_harness import fast_target, running_daemon, wait_for_metrics
from tests.fakes import FakeLlama
from tests.test_alertmanager_e2e import Alertmanager, Webhook, alertmanager, webhook

pytestmark = pytest.mark.prometheus

__all__ = ["alertmanager", "webhook"]  # fixtures, used by name

ROOT = Path(__file__).parent.parent
RULES = sorted((ROOT / "deploy" / "prometheus" / "rules").glob("*.yml"))
READY_TIMEOUT_S = 60.0
USUAL_TPS, SLOW_TPS = 4000.0, 2000.0  # fast enough that the fake's claimed times stay short
HISTORY_HOURS = 7  # past the rules' 6 hours
# Scrape and evaluate every second; alerts go to Alertmanager at once.
PROMETHEUS_INTERVAL = "1s"


def target(name: str) -> Any:
    # Rounds every 5 s with a confirmation 0.5 s after one outside the band.
    return fast_target(name, "http://fake", interval=5.0, confirmation_delay=0.5)


def seeded_state(state: Path, fake: FakeLlama) -> None:
    """The state file of an exporter that has probed this server for seven hours at its usual
    speed: a round of the real daemon writes the file with the series' exact key, then its
    rounds are replaced by a history of them."""
    with running_daemon([target("box")], lambda t: fake.transport(), storage_path=state) as (
        _,
        base,
    ):
        wait_for_metrics(base, lambda text: "llama_speed_baseline_rounds{" in text)
    data = json.loads((state / FILE_NAME).read_text())
    now = time.time()
    start = now - HISTORY_HOURS * 3600
    for band in data["bands"]:
        usual = USUAL_TPS if band["probe"] == "generation" else fake.prompt_tps
        band["rounds"] = [[start + 1200 * n, usual] for n in range(HISTORY_HOURS * 3)]
    (state / FILE_NAME).write_text(json.dumps(data))


@pytest.fixture
def prometheus_for(tmp_path: Path, prometheus_binary: str) -> Iterator[Any]:
    procs: list[subprocess.Popen[bytes]] = []
    log_path = tmp_path / "prometheus.log"

    def start(exporter_port: int, alertmanager_url: str) -> str:
        port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(
            yaml.safe_dump(
                {
                    "global": {
                        "scrape_interval": PROMETHEUS_INTERVAL,
                        "evaluation_interval": PROMETHEUS_INTERVAL,
                    },
                    "rule_files": [str(p) for p in RULES],
                    "alerting": {
                        "alertmanagers": [
                            {"static_configs": [{"targets": [alertmanager_url.split("//")[1]]}]}
                        ]
                    },
                    "scrape_configs": [
                        {
                            "job_name": "llama-speed",
                            "static_configs": [{"targets": [f"127.0.0.1:{exporter_port}"]}],
                        }
                    ],
                }
            )
        )
        with log_path.open("wb") as log:
            procs.append(
                subprocess.Popen(
                    [
                        prometheus_binary,
                        f"--config.file={config}",
                        f"--storage.tsdb.path={tmp_path / 'prometheus-data'}",
                        f"--web.listen-address=127.0.0.1:{port}",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=log,
                )
            )
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            try:
                if httpx.get(f"{url}/-/ready", timeout=5).status_code == 200:
                    return url
            except httpx.TransportError:
                pass
            assert procs[-1].poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)  # poll interval inside the deadline

    try:
        yield start
    finally:
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_a_confirmed_drop_reaches_the_webhook_as_a_critical_page(
    tmp_path: Path, prometheus_for: Any, alertmanager: Alertmanager, webhook: Webhook
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    fake = FakeLlama(gen_tps=USUAL_TPS)
    seeded_state(state, fake)

    fake.gen_tps = SLOW_TPS
    with running_daemon([target("box")], lambda t: fake.transport(), storage_path=state) as (
        _,
        base,
    ):
        exporter_port = int(base.rsplit(":", 1)[1])
        prometheus = prometheus_for(exporter_port, alertmanager.url)

        def paged(received: list[dict[str, Any]]) -> bool:
            return any(
                a["status"] == "firing" and a["labels"]["alertname"].endswith("Regression")
                for n in received
                for a in n["alerts"]
            )

        webhook.wait_for(paged)
        text = httpx.get(f"{base}/metrics", timeout=5).text

    # One page (a later notification of its group may repeat it): the critical of the TG series.
    pages = {
        json.dumps(a["labels"], sort_keys=True): a
        for a in webhook.alerts("firing")
        if a["labels"]["alertname"].endswith("Regression")
    }
    (page,) = pages.values()
    labels = page["labels"]
    assert labels["alertname"] == "LlamaSpeedGenerationRegression"
    assert labels["severity"] == "critical"
    assert labels["target"] == "box"
    assert labels["instance"] == f"127.0.0.1:{exporter_port}"
    assert labels["depth"] == "0"
    assert "fell to 50% of its baseline" in page["annotations"]["summary"]
    assert "against a baseline of 4k tokens/s" in page["annotations"]["description"]
    assert page["annotations"]["runbook_url"].endswith(
        "/docs/runbook.md#llamaspeedgenerationregression"
    )
    # Confirmed before it paged: the exporter ran the confirmation round the rule rests on.
    assert 'llama_speed_probe_confirmations_total{reason="below_band",target="box"}' in text
    confirmations = [
        line for line in text.splitlines()
        if line.startswith('llama_speed_probe_confirmations_total{reason="below_band"')
    ]  # fmt: skip
    assert float(confirmations[0].rsplit(" ", 1)[1]) >= 1
    # Prompt processing kept its speed: nothing about it was paged.
    alerts = httpx.get(f"{prometheus}/api/v1/alerts", timeout=5).json()["data"]["alerts"]
    assert not [a for a in alerts if a["labels"]["alertname"] == "LlamaSpeedPromptRegression"]
