"""Alert delivery through a real Alertmanager (Debian's prometheus-alertmanager) with the
shipped alertmanager.yml, to a webhook receiver in the test: what arrives, what inhibition
suppresses (within one box and llama-server, never across), grouping, and resolve messages.

The alerts are posted to Alertmanager's API, shaped as Prometheus sends them. Their labels
and annotations are those the promtool unit tests in deploy/prometheus/tests expect from the
shipped rules: promtool checks them against the rules' rendered templates, so what is posted
here is what the rules produce for those samples.
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from exporter.llama.server_process import free_port
from tests.test_rules import RUNBOOK_URL, alert_tests, alerts

pytestmark = pytest.mark.prometheus

ROOT = Path(__file__).parent.parent
SHIPPED = ROOT / "deploy" / "compose" / "alertmanager" / "alertmanager.yml"
# Alertmanager starts in about a second; notifications follow group_wait and group_interval
# (1 s in the test's copy). The margins are for a loaded 2-core CI machine.
READY_TIMEOUT_S = 60.0
DELIVERY_TIMEOUT_S = 30.0
BOX_1, BOX_2 = "gpu-box:18088", "gpu-box-2:18088"
ABSENT = "LlamaSpeedExporterAbsent"

Alert = dict[str, Any]


def samples() -> dict[str, list[Alert]]:
    """Each alert as the rules render it, in the firing cases of its promtool tests."""
    found: dict[str, list[Alert]] = {}
    for case in alert_tests():
        for expected in case.get("exp_alerts") or []:
            labels = {"alertname": case["alertname"], **expected["exp_labels"]}
            alert = {"labels": labels, "annotations": expected["exp_annotations"]}
            if alert not in found.setdefault(case["alertname"], []):
                found[case["alertname"]].append(alert)
    return found


def sample(name: str, severity: str | None = None, **labels: str) -> Alert:
    """`name`'s first sample (of `severity`, where one alert has a rule per severity), with
    labels changed where a case needs another box or target; the annotations name the box and
    target too, and follow."""
    found = [a for a in samples()[name] if severity in (None, a["labels"]["severity"])]
    alert = copy.deepcopy(found[0])
    for label, value in labels.items():
        old = alert["labels"].get(label)
        alert["labels"][label] = value
        if old and old != value:
            pattern = re.compile(rf"(?<![\w-]){re.escape(old)}(?![\w-])")
            alert["annotations"] = {
                k: pattern.sub(value, v) for k, v in alert["annotations"].items()
            }
    return alert


def job_missing() -> Alert:
    """LlamaSpeedExporterAbsent for the whole job gone from Prometheus' targets: no box."""
    (alert,) = [a for a in samples()[ABSENT] if "instance" not in a["labels"]]
    return alert


def key(alert: Alert) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(alert["labels"].items()))


@dataclass
class Webhook:
    """The receiver: every notification Alertmanager posts, in order of arrival."""

    url: str
    received: list[dict[str, Any]]
    changed: threading.Condition

    def wait_for(self, done: Callable[[list[dict[str, Any]]], bool]) -> list[dict[str, Any]]:
        deadline = time.monotonic() + DELIVERY_TIMEOUT_S
        with self.changed:
            while not done(self.received):
                left = deadline - time.monotonic()
                got = [(a["status"], a["labels"]) for n in self.received for a in n["alerts"]]
                assert left > 0, f"not delivered in time; received: {got}"
                self.changed.wait(left)
            return list(self.received)

    def alerts(self, status: str) -> list[Alert]:
        with self.changed:
            return [a for n in self.received for a in n["alerts"] if a["status"] == status]


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    received: list[dict[str, Any]] = []
    changed = threading.Condition()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with changed:
                received.append(body)
                changed.notify_all()
            self.send_response(200)
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass  # pytest shows what the assertions need; the access log is noise

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Webhook(f"http://127.0.0.1:{server.server_port}/alert", received, changed)
    finally:
        server.shutdown()
        server.server_close()


def config_for(webhook_url: str) -> dict[str, Any]:
    """The shipped config with its receiver pointed at the webhook, and timers in seconds."""
    config: dict[str, Any] = yaml.safe_load(SHIPPED.read_text())
    (receiver,) = config["receivers"]
    receiver["webhook_configs"] = [{"url": webhook_url, "send_resolved": True}]
    config["route"].update(group_wait="1s", group_interval="1s", repeat_interval="1h")
    return config


@dataclass
class Alertmanager:
    url: str

    def post(self, *posted: Alert, resolved: bool = False) -> None:
        """Post alerts as Prometheus does: firing ones end a few minutes ahead (Prometheus
        re-sends them before then), resolved ones end now."""
        now = datetime.now(UTC)
        ends = now if resolved else now + timedelta(minutes=5)
        body = [
            {**alert, "startsAt": (now - timedelta(minutes=10)).isoformat(),
             "endsAt": ends.isoformat(), "generatorURL": "http://prometheus.example/graph"}
            for alert in posted
        ]  # fmt: skip
        response = httpx.post(f"{self.url}/api/v2/alerts", json=body, timeout=10)
        assert response.status_code == 200, response.text

    def state(self, alert: Alert) -> dict[str, Any]:
        """The alert's status in Alertmanager: active or suppressed, and by what."""
        response = httpx.get(f"{self.url}/api/v2/alerts", timeout=10)
        (found,) = [a for a in response.json() if a["labels"] == alert["labels"]]
        status: dict[str, Any] = found["status"]
        return status


@pytest.fixture
def alertmanager(
    tmp_path: Path, alertmanager_binary: str, amtool: str, webhook: Webhook
) -> Iterator[Alertmanager]:
    config = tmp_path / "alertmanager.yml"
    config.write_text(yaml.safe_dump(config_for(webhook.url)))
    for path in (SHIPPED, config):
        checked = subprocess.run(
            [amtool, "check-config", str(path)], capture_output=True, text=True, check=False
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "alertmanager.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [alertmanager_binary, f"--config.file={config}",
             f"--storage.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
             "--cluster.listen-address="],  # one instance: no gossip port
            stdout=subprocess.DEVNULL, stderr=log,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + READY_TIMEOUT_S
            while True:
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(f"{url}/-/ready", timeout=5).status_code == 200:
                        break
                assert proc.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.2)  # poll interval inside the deadline
            yield Alertmanager(url)
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def delivered(webhook: Webhook, *wanted: Alert, status: str = "firing") -> list[Alert]:
    """Wait until every wanted alert arrived with `status`; return what arrived."""
    keys = {key(a) for a in wanted}
    webhook.wait_for(lambda _: keys <= {key(a) for a in webhook.alerts(status)})
    return webhook.alerts(status)


def severities() -> list[tuple[str, str]]:
    """(alertname, severity) of every alerting rule: the regression alerts have two rules."""
    return sorted({(str(a["alert"]), str(a["labels"]["severity"])) for a in alerts()})


def test_every_alert_has_a_sample() -> None:
    assert set(samples()) == {a["alert"] for a in alerts()}
    found = {(n, a["labels"]["severity"]) for n, group in samples().items() for a in group}
    assert found == set(severities())
    assert job_missing()["labels"] == {"alertname": ABSENT, "severity": "critical",
                                       "job": "llama-speed"}  # fmt: skip


def test_every_alert_arrives_with_its_labels_summary_and_runbook(
    alertmanager: Alertmanager, webhook: Webhook
) -> None:
    # Every alerting rule (the regression alerts' warning and critical both), each on its own
    # box so that none inhibits another here (inhibition has its own tests below), and the
    # whole job missing, which has no box.
    posted = [
        sample(name, severity, instance=f"box-{i}:18088")
        for i, (name, severity) in enumerate(severities())
    ]
    posted.append(job_missing())
    alertmanager.post(*posted)
    arrived = {key(a): a for a in delivered(webhook, *posted)}
    for alert in posted:
        got = arrived[key(alert)]
        assert got["labels"] == alert["labels"]
        assert got["annotations"] == alert["annotations"]
        name = alert["labels"]["alertname"]
        assert got["annotations"]["runbook_url"] == f"{RUNBOOK_URL}#{name.lower()}"
        assert got["annotations"]["summary"].strip()
        assert (
            alert["labels"].get("target")
            or alert["labels"].get("instance")
            or (
                name == ABSENT  # the whole job missing: no box to name
            )
        )


def test_inhibition_stays_within_one_box_and_target(
    alertmanager: Alertmanager, webhook: Webhook
) -> None:
    # Box 1's exporter unscrapeable, and box 2's llama-server prod down.
    absent = sample(ABSENT, instance=BOX_1)
    down = sample("LlamaSpeedServerDown", instance=BOX_2, target="prod")
    alertmanager.post(absent, down)
    delivered(webhook, absent, down)

    # A regression past the critical threshold of box 5's prod, which the rules fire with its
    # warning: one page for the series.
    regression = "LlamaSpeedGenerationRegression"
    critical = sample(regression, "critical", instance="gpu-box-5:18088", target="prod")
    other_depth = sample(regression, "warning", instance="gpu-box-5:18088", target="prod")
    other_depth["labels"]["depth"] = "8192"
    # Each inhibited alert with the source that inhibits it.
    inhibited = [
        (sample("LlamaSpeedGpuMemoryNearlyFull", instance=BOX_1), absent),  # box 1's: blind
        (sample("LlamaSpeedKvCacheNearlyFull", instance=BOX_2, target="prod"), down),
        # Regression alerts carry the box and target of their series: a regression warning
        # of box 1 is blind like the rest, one of box 2's prod only repeats the down page.
        (sample(regression, "warning", instance=BOX_1), absent),
        (sample("LlamaSpeedPromptRegression", "warning", instance=BOX_2, target="prod"), down),
        (sample(regression, "warning", instance="gpu-box-5:18088", target="prod"), critical),
    ]
    kept = [
        # The bug this guards against: box 1 absent silenced box 2's GPU warning.
        sample("LlamaSpeedGpuMemoryNearlyFull", instance=BOX_2),
        # Box 2's other llama-server, and a llama-server of the same name on another box.
        sample("LlamaSpeedKvCacheNearlyFull", instance=BOX_2, target="lab"),
        sample("LlamaSpeedKvCacheNearlyFull", instance="gpu-box-3:18088", target="prod"),
        sample(regression, "warning", instance=BOX_2, target="lab"),
        sample(regression, "warning", instance="gpu-box-3:18088"),
        # The critical regression, and the warning of another depth on its box and target.
        critical,
        other_depth,
    ]
    alertmanager.post(*(alert for alert, _ in inhibited), *kept)
    delivered(webhook, *kept)
    fingerprint = {key(a): a["fingerprint"] for a in webhook.alerts("firing") if a["fingerprint"]}
    for source in (absent, down):
        assert alertmanager.state(source)["state"] == "active"
    for alert, source in inhibited:
        assert alertmanager.state(alert)["inhibitedBy"] == [fingerprint[key(source)]]
    # The whole job missing has no box: it inhibits nothing either.
    alertmanager.post(job_missing())
    delivered(webhook, job_missing())
    for alert in kept:
        assert alertmanager.state(alert) == {"state": "active", "inhibitedBy": [],
                                             "silencedBy": []}  # fmt: skip

    # A later alert in a group of its own: once it arrived, the groups of the inhibited
    # alerts (created before it, with the same group_wait) have been flushed too, and sent
    # nothing.
    sentinel = sample("LlamaSpeedServerDown", instance="gpu-box-4:18088")
    alertmanager.post(sentinel)
    delivered(webhook, sentinel)
    silenced = {key(alert) for alert, _ in inhibited}
    assert silenced.isdisjoint(key(a) for a in webhook.alerts("firing"))


def test_grouping_one_notification_per_alert_box_and_target(
    alertmanager: Alertmanager, webhook: Webhook
) -> None:
    name = "LlamaSpeedGenerationRegression"
    regression = sample(name, "warning", instance=BOX_1, target="prod")
    # Another depth of the same model, past the critical threshold: the same notification.
    deeper = sample(name, "critical", instance=BOX_1, target="prod")
    deeper["labels"]["depth"] = "4096"
    other_target = sample(name, "warning", instance=BOX_1, target="lab")
    other_box = sample(name, "warning", instance=BOX_2, target="prod")
    gpu_1 = sample("LlamaSpeedGpuMemoryNearlyFull", instance=BOX_1)
    gpu_2 = sample("LlamaSpeedGpuMemoryNearlyFull", instance=BOX_2)
    posted = [regression, deeper, other_target, other_box, gpu_1, gpu_2]
    alertmanager.post(*posted)
    delivered(webhook, *posted)
    groups = {
        tuple(sorted(n["groupLabels"].items())): sorted(key(a) for a in n["alerts"])
        for n in webhook.received
    }
    assert groups == {
        (("alertname", name), ("instance", BOX_1), ("target", "prod")): sorted(
            [key(regression), key(deeper)]
        ),
        (("alertname", name), ("instance", BOX_1), ("target", "lab")): [key(other_target)],
        (("alertname", name), ("instance", BOX_2), ("target", "prod")): [key(other_box)],
        (("alertname", gpu_1["labels"]["alertname"]), ("instance", BOX_1)): [key(gpu_1)],
        (("alertname", gpu_2["labels"]["alertname"]), ("instance", BOX_2)): [key(gpu_2)],
    }


def test_resolved_alerts_are_sent_and_read_right(
    alertmanager: Alertmanager, webhook: Webhook
) -> None:
    regression = sample("LlamaSpeedGenerationRegression", "warning")
    # On another box: a server down inhibits the warnings of its own box and target.
    down = sample("LlamaSpeedServerDown", instance=BOX_2)
    alertmanager.post(regression, down)
    delivered(webhook, regression, down)
    alertmanager.post(regression, down, resolved=True)
    resolved = {key(a): a for a in delivered(webhook, regression, down, status="resolved")}
    for alert in (regression, down):
        got = resolved[key(alert)]
        # Alertmanager repeats the last firing annotations on resolve: the rules word them
        # so that they read right either way (test_rules checks the wording).
        assert got["annotations"] == alert["annotations"]
        assert got["endsAt"] >= got["startsAt"]
    statuses = [n["status"] for n in webhook.received if key(regression) in map(key, n["alerts"])]
    assert statuses == ["firing", "resolved"]
