"""Runs the real daemon (scheduler, web server, collectors) on a thread, for tests."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from exporter.config import Config, Target
from exporter.daemon import Daemon
from exporter.probe.plan import MeasurePlan
from exporter.schedule.plan import Schedule


def fast_target(name: str, url: str, api_key: Any = None, **changes: Any) -> Target:
    """A target that probes every second or so; `changes` may name plan or schedule fields."""
    values: dict[str, Any] = {
        "interval": 1.0,
        "timeout": 0.8,
        "jitter": 0.0,
        "discovery_interval": 0.5,
        "prompt_tokens": 64,
        "generation_tokens": 16,
        "duty_budget": 1.0,
        **changes,
    }
    return Target(name, url, api_key, plan=MeasurePlan.pick(values), schedule=Schedule.pick(values))


@contextmanager
def running_daemon(
    targets: list[Target],
    transport_factory: Callable[[Target], httpx.AsyncBaseTransport | None] = lambda t: None,
    web_config_file: Path | None = None,
    storage_path: Path | None = None,
    **kwargs: Any,
) -> Iterator[tuple[Daemon, str]]:
    # Without an NVML to talk to, tests run with the GPU collector off unless they bring one.
    gpu = "nvml" in kwargs
    config = Config(
        tuple(targets), "127.0.0.1:0", "/metrics", "console", "warning", gpu=gpu,
        web_config_file=web_config_file, storage_path=storage_path,
    )  # fmt: skip
    daemon = Daemon(config, transport_factory=transport_factory, first_probe_delay=0.1, **kwargs)
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            asyncio.run(daemon.run(handle_signals=False))
        except BaseException as exc:  # surfaced to the test below
            errors.append(exc)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield daemon, f"http://127.0.0.1:{daemon.web.port}"
    finally:
        deadline = time.monotonic() + 5
        while daemon._loop is None and time.monotonic() < deadline:
            time.sleep(0.01)
        daemon.request_stop_threadsafe()
        thread.join(timeout=10)
        assert not thread.is_alive(), "daemon did not stop"
        assert not errors, errors


def wait_for_metrics(base: str, predicate: Callable[[str], bool], timeout: float = 15) -> str:
    """Scrape until `predicate` holds; every scrape must answer 200."""
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        response = httpx.get(f"{base}/metrics", timeout=5)
        assert response.status_code == 200
        text = response.text
        if predicate(text):
            return text
        time.sleep(0.05)  # poll interval inside a deadline, not a wait for an event
    raise AssertionError(f"condition not met within {timeout} s; last scrape:\n{text}")


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in an exposition, or None."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            return float(value)
    return None
