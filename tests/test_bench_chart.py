"""The bench chart: which points each line gets, and a PNG of the promised size."""

from __future__ import annotations

import re
import stat
import struct
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path

import pytest

from exporter.bench.chart import (
    DPI,
    FIGSIZE_INCHES,
    ChartUnavailableError,
    Series,
    chart_series,
    write_chart,
)
from exporter.bench.record import (
    BenchRecord,
    HostRecord,
    Mode,
    PlanRecord,
    RunRecord,
    SampleRecord,
    ServerRecord,
    Status,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PYPROJECT = Path(__file__).parent.parent / "pyproject.toml"


def samples(depth: int, pp: Sequence[float], tg: Sequence[float]) -> tuple[SampleRecord, ...]:
    return (
        *(SampleRecord(kind="prompt", depth=depth, tokens=512, seconds=512 / v) for v in pp),
        *(SampleRecord(kind="generation", depth=depth, tokens=127, seconds=127 / v) for v in tg),
    )


def run(
    ctx: int | None, n_ctx: int, measured: tuple[SampleRecord, ...], status: Status = "stable"
) -> RunRecord:
    server = ServerRecord(
        model="m", model_path="/m.gguf", quant="Q4_K_M", build="b1", n_ctx=n_ctx, slots=1
    )
    return RunRecord(ctx=ctx, status=status, server=server, samples=measured)


def record(label: str, mode: Mode, runs: Sequence[RunRecord]) -> BenchRecord:
    return BenchRecord(
        label=label,
        mode=mode,
        started_at="2026-02-14T00:00:00+00:00",
        exporter_version="0.1.0",
        host=HostRecord(hostname="h", cpu="c", cpu_count=2, memory_bytes=None),
        plan=PlanRecord(
            prompt_tokens=(512,), generation_tokens=(128,), depths=(0,), repetitions=2, warmup=False
        ),
        runs=tuple(runs),
    )


def sweep(label: str) -> BenchRecord:
    return record(
        label,
        "launch",
        [
            # Out of order, as a resumed sweep could write them: the lines must still run along x.
            run(65536, 65536, samples(0, [50, 52], [21, 21.2])),
            run(32768, 32768, samples(0, [100, 102], [22, 22.2]) + samples(4096, [90], [20])),
            run(262144, 262144, (), status="not_stable"),
        ],
    )


def served(label: str) -> BenchRecord:
    measured = samples(0, [100, 110], [22, 24]) + samples(8192, [80, 90], [18, 20])
    return record(label, "target", [run(None, 32768, measured)])


def test_a_context_sweep_is_charted_against_the_context() -> None:
    series = chart_series([sweep("iq3")])
    assert [(s.label, s.test, s.kind, s.x_axis, s.x) for s in series] == [
        ("iq3", "pp512", "prompt", "context", (32768, 65536)),
        ("iq3", "tg128", "generation", "context", (32768, 65536)),
        ("iq3", "pp512 @ d4096", "prompt", "context", (32768,)),
        ("iq3", "tg128 @ d4096", "generation", "context", (32768,)),
    ]
    assert series[0].means == pytest.approx((101.0, 51.0))
    assert series[0].sds == pytest.approx((2**0.5, 2**0.5))
    assert series[2].sds == (None,)


def test_single_runs_are_charted_against_the_depth() -> None:
    series = chart_series([served("a"), served("b")])
    assert [(s.label, s.test, s.x_axis, s.x) for s in series] == [
        ("a", "pp512", "depth", (0, 8192)),
        ("a", "tg128", "depth", (0, 8192)),
        ("b", "pp512", "depth", (0, 8192)),
        ("b", "tg128", "depth", (0, 8192)),
    ]
    assert series[1].means == pytest.approx((23.0, 19.0))


def test_runs_without_tests_do_not_count_as_a_sweep() -> None:
    failed = run(131072, 131072, (), status="not_stable")
    one = record("x", "launch", [run(32768, 32768, samples(0, [10, 11], [5, 6])), failed])
    assert {s.x_axis for s in chart_series([one])} == {"depth"}


def test_records_sharing_a_label_get_numbered_lines() -> None:
    assert {s.label for s in chart_series([sweep("m"), sweep("m")])} == {"m (1)", "m (2)"}


def test_nothing_to_chart() -> None:
    failed = record("x", "launch", [run(32768, 32768, (), status="not_stable")])
    assert chart_series([failed]) == []


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_SIGNATURE
    length, chunk = struct.unpack(">I4s", data[8:16])
    assert (length, chunk) == (13, b"IHDR")
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@pytest.mark.parametrize(
    "records",
    [
        pytest.param([sweep("iq3"), sweep("q2")], id="context"),
        pytest.param([served("a")], id="depth"),
        pytest.param([], id="empty"),
    ],
)
def test_write_chart_writes_a_png_of_the_figure_size(
    tmp_path: Path, records: list[BenchRecord]
) -> None:
    path = tmp_path / "chart.png"
    write_chart(records, path)
    width, height = FIGSIZE_INCHES
    assert png_size(path.read_bytes()) == (round(width * DPI), round(height * DPI))


def test_the_same_records_give_the_same_png(tmp_path: Path) -> None:
    first, second = tmp_path / "first.png", tmp_path / "second.png"
    write_chart([sweep("iq3")], first)
    write_chart([sweep("iq3")], second)
    assert first.read_bytes() == second.read_bytes()
    assert b"Matplotlib" not in first.read_bytes()


def test_write_chart_without_matplotlib(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # None in sys.modules makes an import fail; submodules already loaded must go the same way.
    for name in ["matplotlib", *(n for n in sys.modules if n.startswith("matplotlib."))]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ChartUnavailableError) as raised:
        write_chart([sweep("iq3")], tmp_path / "chart.png")
    assert not (tmp_path / "chart.png").exists()
    # The hint must name what pip can install: the project itself is not on PyPI.
    hint = str(raised.value)
    assert "llama-speed-exporter[" not in hint
    requirement = re.search(r"pip install '(matplotlib[^']*)'", hint)
    assert requirement is not None, hint
    assert "pip install '.[bench]'" in hint
    # Both name the bench extra's own requirement, so the hint cannot drift from pyproject.
    extras = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]
    assert requirement.group(1) in extras["bench"]


def test_a_chart_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "chart.png"
    write_chart([sweep("iq3")], path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_series_is_immutable() -> None:
    series = Series("a", "pp512", "prompt", "depth", (0,), (1.0,), (None,))
    with pytest.raises(AttributeError):
        series.label = "b"  # type: ignore[misc]
