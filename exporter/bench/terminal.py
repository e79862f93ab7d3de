"""The progress display of a bench on a terminal (rich, from the `bench` extra)."""

from __future__ import annotations

from types import TracebackType
from typing import Self

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

from exporter.bench.progress import outcome
from exporter.bench.record import RunRecord
from exporter.probe.results import Sample
from exporter.probe.stats import test_name


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

    @classmethod
    def on_stderr(cls) -> TerminalProgress:
        return cls(Console(stderr=True))

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
                self._task, description=f"{self._title}: {outcome(run)}", refresh=True
            )
            self._progress.stop_task(self._task)
