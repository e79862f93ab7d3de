"""The bench's PP/TG chart: tokens per second against context, or against depth for one server.

A sweep over contexts (launch mode) is drawn against the context, on a log2 axis since the
sweep doubles it. When every file holds a single run (target mode, or one -c value) there is no
context to sweep, and the chart shows how speed falls as tokens fill the context: the depth.

The data selection (`chart_series`) is pure, so what is drawn is tested without images;
matplotlib is an optional dependency, imported only when a chart is written.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

from exporter.bench.files import write_private
from exporter.bench.record import BenchRecord, RunRecord
from exporter.bench.units import ctx_label
from exporter.probe.results import Kind
from exporter.probe.stats import test_name

if TYPE_CHECKING:
    from matplotlib.axes import Axes

XAxis = Literal["context", "depth"]

FIGSIZE_INCHES: Final = (11.0, 4.5)
DPI: Final = 100
# The package is installed from a checkout, not from PyPI: name what pip can install anywhere.
MISSING_MATPLOTLIB: Final = (
    "the chart needs matplotlib: pip install 'matplotlib>=3.8,<4' "
    "(or, in the checkout, pip install '.[bench]')"
)

_PANELS: Final[tuple[tuple[Kind, str], ...]] = (
    ("prompt", "Prompt processing (PP)"),
    ("generation", "Token generation (TG)"),
)
_X_TITLES: Final[dict[XAxis, str]] = {
    "context": "context (tokens, -c)",
    "depth": "tokens already in context (depth)",
}


class ChartUnavailableError(Exception):
    """The chart cannot be drawn here: matplotlib is not installed."""


@dataclass(frozen=True)
class Series:
    """One line: one record's test across contexts, or across depths."""

    label: str  # the record's label, numbered when two records share one
    test: str  # "pp512 @ d4096" against context; "pp512" against depth
    kind: Kind
    x_axis: XAxis
    x: tuple[int, ...]
    means: tuple[float, ...]  # tokens per second
    sds: tuple[float | None, ...]  # None for a single repetition


def chart_series(records: Sequence[BenchRecord]) -> list[Series]:
    charted = [[run for run in record.runs if run.tests] for record in records]
    x_axis: XAxis = "depth" if all(len(runs) <= 1 for runs in charted) else "context"
    out: list[Series] = []
    for label, runs in zip(unique_labels(records), charted, strict=True):
        if x_axis == "context":
            out.extend(_against_context(label, runs))
        else:
            out.extend(_against_depth(label, runs))
    return out


def write_chart(records: Sequence[BenchRecord], path: Path) -> None:
    series = chart_series(records)

    def draw(axes: Sequence[Any]) -> None:
        for ax, (kind, title) in zip(axes, _PANELS, strict=True):
            _draw_panel(ax, title, [s for s in series if s.kind == kind])

    write_panels(path, len(_PANELS), draw)


def write_panels(path: Path, panels: int, draw: Callable[[Sequence[Any]], None]) -> None:
    """A PNG of `panels` side by side, each drawn by `draw`; every bench chart is one."""
    try:
        # Lazily: `bench` writes its reports without matplotlib, only the chart needs it.
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
        from matplotlib.figure import Figure  # noqa: PLC0415
    except ImportError as exc:
        raise ChartUnavailableError(MISSING_MATPLOTLIB) from exc

    # A Figure with its own canvas, not pyplot: no global state, no GUI backend chosen.
    figure = Figure(figsize=FIGSIZE_INCHES, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    draw(figure.subplots(1, panels))
    # Without the Software entry the PNG holds no matplotlib version: same data, same bytes.
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=DPI, metadata={"Software": None})
    write_private(path, png.getvalue())


def unique_labels(records: Sequence[BenchRecord]) -> list[str]:
    labels = [record.label for record in records]
    return [
        f"{label} ({i + 1})" if labels.count(label) > 1 else label for i, label in enumerate(labels)
    ]


def _against_context(label: str, runs: list[RunRecord]) -> list[Series]:
    points: dict[tuple[int, bool, int], list[tuple[int, float, float | None]]] = {}
    for run in runs:
        context = run.context
        if context is None:
            continue  # nowhere to place it on a context axis
        for t in run.tests:
            key = (t.depth, t.kind != "prompt", t.tokens)
            points.setdefault(key, []).append((context, t.mean, t.sd))
    out = []
    for (depth, generation, tokens), group in sorted(points.items()):
        kind: Kind = "generation" if generation else "prompt"
        out.append(_series(label, test_name(kind, tokens, depth), kind, "context", group))
    return out


def _against_depth(label: str, runs: list[RunRecord]) -> list[Series]:
    points: dict[tuple[bool, int], list[tuple[int, float, float | None]]] = {}
    for run in runs:
        for t in run.tests:
            points.setdefault((t.kind != "prompt", t.tokens), []).append((t.depth, t.mean, t.sd))
    out = []
    for (generation, tokens), group in sorted(points.items()):
        kind: Kind = "generation" if generation else "prompt"
        out.append(_series(label, test_name(kind, tokens, 0), kind, "depth", group))
    return out


def _series(
    label: str,
    test: str,
    kind: Kind,
    x_axis: XAxis,
    points: list[tuple[int, float, float | None]],
) -> Series:
    ordered = sorted(points, key=lambda p: p[0])
    return Series(
        label=label,
        test=test,
        kind=kind,
        x_axis=x_axis,
        x=tuple(p[0] for p in ordered),
        means=tuple(p[1] for p in ordered),
        sds=tuple(p[2] for p in ordered),
    )


def _draw_panel(ax: Axes, title: str, series: list[Series]) -> None:
    ax.set_title(title)
    ax.set_ylabel("tokens per second")
    if not series:
        ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    for s in series:
        ax.errorbar(
            s.x,
            s.means,
            yerr=[0.0 if sd is None else sd for sd in s.sds],
            marker="o",
            capsize=3,
            label=f"{s.label} {s.test}",
        )
    x_axis = series[0].x_axis
    if x_axis == "context":
        ax.set_xscale("log", base=2)
    ticks = sorted({x for s in series for x in s.x})
    ax.set_xticks(ticks, labels=[ctx_label(x) for x in ticks])
    ax.minorticks_off()
    ax.set_xlabel(_X_TITLES[x_axis])
    # From zero, so that a drop reads at its true size; with room above the highest error bar.
    top = max(m + (sd or 0.0) for s in series for m, sd in zip(s.means, s.sds, strict=True))
    ax.set_ylim(0, top * 1.1 or 1.0)
    ax.grid(visible=True, alpha=0.3)
    ax.legend(fontsize="small")
