"""A real Prometheus scrapes the exporter over HTTPS with basic auth, as the README says to.

Prometheus is Go: its TLS stack and HTTP client are the ones every exporter-toolkit exporter
is scraped with, so this checks that the web config means here what it means there, not only
that Python clients accept it.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from exporter.llama.server_process import free_port
from tests.certificates import make_certificate
from tests.test_webconfig import (
    bcrypt_hash,
    secured_daemon,
    trusting,
    write_web_config,
)

SCRAPE_DEADLINE_S = 60.0


@contextlib.contextmanager
def prometheus(binary: str, directory: Path, scrape_configs: list[dict[str, Any]]) -> Iterator[str]:
    """A Prometheus scraping every second; yields the base URL of its API."""
    port = free_port()
    config = directory / "prometheus.yml"
    config.write_text(
        yaml.safe_dump({"global": {"scrape_interval": "1s"}, "scrape_configs": scrape_configs})
    )
    with (directory / "prometheus.log").open("wb") as log:
        proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={directory / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=log,
        )  # fmt: skip
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def up_by_job(base: str) -> dict[str, tuple[float, str]]:
    """`up` of each job, with the last scrape error Prometheus saw for it."""
    values: dict[str, tuple[float, str]] = {}
    with contextlib.suppress(httpx.TransportError, json.JSONDecodeError):
        # While Prometheus starts it refuses connections, then answers with non-JSON text.
        result = httpx.get(f"{base}/api/v1/query", params={"query": "up"}, timeout=5).json()
        targets = httpx.get(f"{base}/api/v1/targets", timeout=5).json()
        errors = {t["scrapePool"]: t["lastError"] for t in targets["data"]["activeTargets"]}
        for series in result["data"]["result"]:
            job = series["metric"]["job"]
            values[job] = (float(series["value"][1]), errors.get(job, ""))
    return values


def wait_for(base: str, done: Callable[[dict[str, tuple[float, str]]], bool]) -> dict[str, Any]:
    deadline = time.monotonic() + SCRAPE_DEADLINE_S
    seen: dict[str, tuple[float, str]] = {}
    while time.monotonic() < deadline:
        seen = up_by_job(base)
        if done(seen):
            return seen
        time.sleep(0.5)  # poll interval inside the deadline
    raise AssertionError(f"Prometheus did not get there within {SCRAPE_DEADLINE_S} s: {seen}")


@pytest.mark.prometheus
def test_prometheus_scrapes_over_https_with_basic_auth(
    prometheus_binary: str, tmp_path: Path
) -> None:
    cert, key = make_certificate(tmp_path, "server")
    web = write_web_config(
        tmp_path / "web.yml",
        {
            "tls_server_config": {"cert_file": cert.name, "key_file": key.name},
            "basic_auth_users": {"prometheus": bcrypt_hash("s3cret")},
        },
    )
    with secured_daemon(web) as (_, port):
        target = {"targets": [f"127.0.0.1:{port}"]}
        tls = {"ca_file": str(cert), "server_name": "localhost"}

        def job(name: str, **settings: Any) -> dict[str, Any]:
            return {"job_name": name, "static_configs": [target], **settings}

        jobs = [
            job("secured", scheme="https", tls_config=tls,
                basic_auth={"username": "prometheus", "password": "s3cret"}),
            job("wrong-password", scheme="https", tls_config=tls,
                basic_auth={"username": "prometheus", "password": "guess"}),
            job("plain-http"),
        ]  # fmt: skip
        with prometheus(prometheus_binary, tmp_path, jobs) as base:
            seen = wait_for(base, lambda up: len(up) == 3 and up["secured"][0] == 1.0)
            # Failed scrapes are up == 0 from the first one, and stay so.
            assert seen["wrong-password"][0] == 0.0 and "401" in seen["wrong-password"][1]
            assert seen["plain-http"][0] == 0.0 and "400" in seen["plain-http"][1]
            scraped = httpx.get(
                f"{base}/api/v1/query",
                params={"query": 'llama_speed_web_config_reload_success{job="secured"}'},
            ).json()["data"]["result"]
            assert [s["value"][1] for s in scraped] == ["1"]

        # And a client without the password is refused, over the same TLS.
        refused = httpx.get(f"https://localhost:{port}/metrics", verify=trusting(cert))
        assert refused.status_code == 401
