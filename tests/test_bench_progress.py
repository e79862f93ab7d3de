"""What a bench shows while it runs: bars on a terminal, log events elsewhere."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from rich.console import Console

from exporter import log
from exporter.bench.progress import LogProgress, outcome
from exporter.bench.record import HostLoadRecord
from exporter.bench.terminal import TerminalProgress
from exporter.llama.client import Timings
from exporter.probe.results import Sample
from tests.test_bench_report import not_stable_run, stable_run

SAMPLE = Sample("generation", 0, 127, 0.1, None, Timings(1, 1.0, 0, 128, 100.0))


def test_the_terminal_shows_each_run_with_its_last_sample_then_its_outcome() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=200, color_system=None)
    with TerminalProgress(console) as progress:
        progress.run_started(1, 2, "ctx 32768", 12)
        progress.phase("loading the model")
        progress.sample(SAMPLE)
        progress.run_finished(stable_run())
        progress.run_started(2, 2, "ctx 262144", 12)
        progress.run_finished(not_stable_run())
    shown = out.getvalue()
    assert "[1/2] ctx 32768: tg128 1270.00 t/s" in shown  # the sample, named as llama-bench
    assert "[1/2] ctx 32768: ✅ Stable: pp512 101.70 ± 0.75 t/s" in shown
    assert "[2/2] ctx 262144: ❌ Not stable (" in shown


@pytest.fixture
def stdlib_logs() -> Iterator[None]:
    """The command's logging (structlog through the standard library), for one test."""
    root = logging.getLogger()
    handlers, level, config = root.handlers[:], root.level, structlog.get_config()
    log.configure("json", "debug")
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        structlog.configure(**config)


@pytest.mark.usefixtures("stdlib_logs")
def test_without_a_terminal_each_event_is_a_log_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="bench")
    with LogProgress() as progress:
        progress.run_started(1, 1, "ctx 4096", 2)
        progress.sample(SAMPLE)
        progress.run_finished(stable_run())
    # structlog hands the standard library its event dict, rendered only by the handler.
    events: list[dict[str, Any]] = [
        r.msg for r in caplog.records if r.name == "bench" and isinstance(r.msg, dict)
    ]
    assert [e["event"] for e in events] == [
        "bench_run_started",
        "bench_sample",
        "bench_run_finished",
    ]
    assert events[1]["test"] == "tg128"
    assert events[2]["status"] == "stable"
    assert events[2]["tests"]["pp512"] == pytest.approx(101.70, abs=0.01)


def test_a_disturbed_run_says_so_as_it_ends() -> None:
    load = HostLoadRecord(seconds=60.0, cores=2, steal_percent=0.0, other_cpu_seconds=60.0)
    run = stable_run().model_copy(update={"host_load": load})
    assert outcome(run).startswith(
        "✅ Stable (⚠️ disturbed: other processes used 1.00 cores on average (50 % of 2; "
        "limit 0.25)): pp512 "
    )
    assert "disturbed" not in outcome(stable_run())
