"""`bench chart --quality`: each variant's quality against its speed, one point per run.

The owner's question, "better quality without a speed penalty?", drawn: x is a run's speed
(the first PP and the first TG test at depth 0, one panel each, with the repetitions' standard
deviation), y its mean KL divergence from the baseline (with llama-perplexity's ±), on a log
scale since quants lie orders of magnitude apart. Lower and further right is better. Without
KL divergence in every result, y is PPL instead, on a linear scale.

As in `exporter.bench.chart`, the data selection (`quality_points`) is pure and tested without
images; matplotlib is imported only when a chart is written.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

from exporter.bench.chart import (
    unique_labels,
    write_panels,
)
from exporter.bench.record import BenchRecord
from exporter.bench.units import ctx_label
from exporter.probe.results import Kind

if TYPE_CHECKING:
    from matplotlib.axes import Axes

Figure = Literal["KLD", "PPL"]

_PANELS: Final[tuple[tuple[Kind, str], ...]] = (
    ("prompt", "Prompt processing (PP)"),
    ("generation", "Token generation (TG)"),
)
_Y_TITLES: Final[dict[Figure, str]] = {
    "KLD": "mean KL divergence from the baseline (lower is better)",
    "PPL": "perplexity of the text (lower is better)",
}


@dataclass(frozen=True)
class QualityPoint:
    label: str  # the record's label, and the run's context when it has several
    test: str  # "tg128"
    kind: Kind
    speed: float  # tokens per second, mean over the repetitions
    speed_sd: float | None
    figure: Figure
    value: float
    error: float


def quality_points(records: Sequence[BenchRecord]) -> list[QualityPoint]:
    """A point per run, kind and record, for every run with speed and measured quality."""
    qualities = [r.quality for record in records for r in record.runs if r.quality is not None]
    figure: Figure = (
        "KLD"
        if qualities and all(q.kld is not None for q in qualities if q.status == "measured")
        else "PPL"
    )
    points = []
    for label, record in zip(unique_labels(records), records, strict=True):
        runs = [run for run in record.runs if run.tests]
        for run in runs:
            quality = run.quality
            if quality is None or quality.status != "measured":
                continue
            estimate = quality.kld if figure == "KLD" else quality.ppl
            if estimate is None:
                continue
            name = f"{label} {ctx_label(run.context)}" if len(runs) > 1 else label
            for kind, _ in _PANELS:
                test = next((t for t in run.tests if t.kind == kind and t.depth == 0), None)
                if test is not None:
                    points.append(
                        QualityPoint(
                            label=name,
                            test=test.name,
                            kind=kind,
                            speed=test.mean,
                            speed_sd=test.sd,
                            figure=figure,
                            value=estimate.value,
                            error=estimate.error,
                        )
                    )
    return points


def write_quality_chart(records: Sequence[BenchRecord], path: Path) -> None:
    points = quality_points(records)

    def draw(axes: Sequence[Any]) -> None:
        for ax, (kind, title) in zip(axes, _PANELS, strict=True):
            _draw_panel(ax, title, [p for p in points if p.kind == kind])

    write_panels(path, len(_PANELS), draw)


def _draw_panel(ax: Axes, title: str, points: list[QualityPoint]) -> None:
    ax.set_title(title)
    if not points:
        ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    for point in points:
        ax.errorbar(
            [point.speed],
            [point.value],
            xerr=[point.speed_sd or 0.0],
            yerr=[point.error],
            marker="o",
            capsize=3,
            linestyle="none",
            label=f"{point.label} ({point.test})",
        )
    figure = points[0].figure
    if figure == "KLD" and all(p.value > 0 for p in points):
        ax.set_yscale("log")
    ax.set_xlabel("tokens per second")
    ax.set_ylabel(_Y_TITLES[figure])
    ax.grid(visible=True, alpha=0.3)
    ax.legend(fontsize="small")
