"""What a bench shows while it runs: log lines, or a progress display on a terminal.

The display (`exporter.bench.terminal`) needs rich, from the `bench` extra; without it, or off a
terminal, the same events are log lines.
"""

from __future__ import annotations

from types import TracebackType
from typing import Protocol, Self

import structlog

from exporter.bench.quality_figures import short_cell
from exporter.bench.record import STATUS_TEXT, RunRecord
from exporter.bench.report import DISTURBED
from exporter.bench.sweep import Observer
from exporter.bench.units import speed
from exporter.probe.results import Sample
from exporter.probe.stats import test_name

log = structlog.get_logger("bench")


class Display(Observer, Protocol):
    """A bench's observer, shown while in its context."""

    def __enter__(self) -> Self: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


def display(*, interactive: bool) -> Display:
    """The terminal display where wanted and rich is installed; log lines otherwise."""
    if interactive:
        try:
            from exporter.bench.terminal import TerminalProgress  # noqa: PLC0415 - optional
        except ImportError:  # rich comes with the bench extra
            return LogProgress()
        return TerminalProgress.on_stderr()
    return LogProgress()


def outcome(run: RunRecord) -> str:
    figures = ", ".join(f"{t.name} {speed(t)} t/s" for t in run.tests)
    why = f" ({run.reason})" if run.reason and run.status != "stable" else ""
    # Said as the run ends, not only in the report: the owner may rerun it at once.
    disturbed = f" ({DISTURBED}: {'; '.join(run.disturbed)})" if run.disturbed else ""
    quality = f"; quality {short_cell(run.quality)}" if run.quality is not None else ""
    text = f"{STATUS_TEXT[run.status]}{why}{disturbed}" + (f": {figures}" if figures else "")
    return text + quality


class LogProgress:
    """The same events as structured log lines, for a bench run by a script or CI."""

    def __init__(self) -> None:
        self._title = ""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    def run_started(self, index: int, total: int, title: str, samples_expected: int) -> None:
        self._title = title
        log.info("bench_run_started", run=index, of=total, title=title, samples=samples_expected)

    def phase(self, text: str) -> None:
        log.info("bench_phase", title=self._title, phase=text)

    def sample(self, sample: Sample) -> None:
        log.debug(
            "bench_sample",
            title=self._title,
            test=test_name(sample.kind, sample.tokens, sample.depth),
            tokens_per_second=round(sample.tokens_per_second, 2),
        )

    def run_finished(self, run: RunRecord) -> None:
        log.info(
            "bench_run_finished",
            title=self._title,
            status=run.status,
            reason=run.reason or None,
            tests={t.name: round(t.mean, 2) for t in run.tests},
            disturbed=list(run.disturbed) or None,
            quality=short_cell(run.quality) if run.quality is not None else None,
        )
