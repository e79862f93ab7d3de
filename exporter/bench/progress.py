"""What a bench shows while it runs: a rich progress display on a terminal, log lines elsewhere."""

from __future__ import annotations

from types import TracebackType
from typing import Self

import structlog
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from exporter.bench.record import STATUS_TEXT, RunRecord
from exporter.bench.stats import test_name
from exporter.bench.units import speed
from exporter.probe.results import Sample

log = structlog.get_logger("bench")


def _outcome(run: RunRecord) -> str:
    figures = ", ".join(f"{t.name} {speed(t)} t/s" for t in run.tests)
    why = f" ({run.reason})" if run.reason and run.status != "stable" else ""
    return f"{STATUS_TEXT[run.status]}{why}" + (f": {figures}" if figures else "")


class TerminalProgress:
    """One bar per run, advancing with each sample; finished runs stay on screen.

    Every event is drawn at once (`refresh=True`), not at the display's next tick: a phase can
    be shorter than a tick, and the last sample before an interrupt should be on screen.
    """

    def __init__(self, console: Console) -> None:
        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        )
        self._task: TaskID | None = None
        self._title = ""

    def __enter__(self) -> Self:
        self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._progress.stop()

    def run_started(self, index: int, total: int, title: str, samples_expected: int) -> None:
        self._title = f"[{index}/{total}] {title}"
        self._task = self._progress.add_task(self._title, total=samples_expected)

    def phase(self, text: str) -> None:
        if self._task is not None:
            self._progress.update(self._task, description=f"{self._title}: {text}", refresh=True)

    def sample(self, sample: Sample) -> None:
        if self._task is not None:
            name = test_name(sample.kind, sample.tokens, sample.depth)
            self._progress.update(
                self._task,
                advance=1,
                description=f"{self._title}: {name} {sample.tokens_per_second:.2f} t/s",
                refresh=True,
            )

    def run_finished(self, run: RunRecord) -> None:
        if self._task is not None:
            self._progress.update(
                self._task, description=f"{self._title}: {_outcome(run)}", refresh=True
            )
            self._progress.stop_task(self._task)


class LogProgress:
    """The same events as structured log lines, for a bench run by a script or CI."""

    def __init__(self) -> None:
        self._title = ""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
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
        )
