"""`bench compare`: the Markdown table of two bench results, golden, and its noise verdicts."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from exporter.bench.compare import (
    COMPARE_SCHEMA,
    compare_data,
    compare_markdown,
    relative_change_percent,
    verdict,
)
from exporter.bench.record import (
    BenchRecord,
    GpuMemory,
    HostLoadRecord,
    HostRecord,
    PlanRecord,
    RunRecord,
    SampleRecord,
    ServerRecord,
    Status,
    load,
)
from exporter.bench.units import ctx_label
from exporter.probe.stats import TestStats
from tests.golden_files import check_golden
from tests.test_bench_report import gpus as report_gpus

GIB = 1024**3
PP, TG = 512, 127  # TG samples time the steps after the first token: tg128


def samples(pp: Sequence[float], tg: Sequence[float], depth: int = 0) -> tuple[SampleRecord, ...]:
    """One sample per speed, timed so that its tokens per second is exactly that speed."""
    return (
        *(SampleRecord(kind="prompt", depth=depth, tokens=PP, seconds=PP / v) for v in pp),
        *(SampleRecord(kind="generation", depth=depth, tokens=TG, seconds=TG / v) for v in tg),
    )


def gpus(gib0: float, gib1: float) -> tuple[GpuMemory, ...]:
    # The comparison shows the GPUs' whole use; what the server holds of it does not matter.
    return report_gpus((gib0, gib1), (gib0, gib1))


def run(
    ctx: int,
    status: Status = "stable",
    *,
    measured: tuple[SampleRecord, ...] = (),
    memory: tuple[GpuMemory, ...] = (),
    reason: str = "",
    rss: int | None = None,
) -> RunRecord:
    server = ServerRecord(
        model="model",
        model_path="/models/model.gguf",
        quant="IQ3_M",
        build="b11434",
        n_ctx=ctx,
        slots=1,
    )
    return RunRecord(
        ctx=ctx,
        status=status,
        reason=reason,
        server=server if status != "not_stable" else None,
        samples=measured,
        gpus=memory,
        server_rss_bytes=rss,
    )


def record(label: str, runs: Sequence[RunRecord], *, started_at: str) -> BenchRecord:
    return BenchRecord(
        label=label,
        mode="launch",
        started_at=started_at,
        exporter_version="0.1.0",
        llama_cpp_build="b11434",
        host=HostRecord(hostname="lab", cpu="Ryzen 7 5700X", cpu_count=16, memory_bytes=64 * GIB),
        plan=PlanRecord(
            prompt_tokens=(PP,),
            generation_tokens=(TG + 1,),
            depths=(0,),
            repetitions=3,
            warmup=True,
        ),
        runs=tuple(runs),
    )


def iq3() -> BenchRecord:
    return record(
        "Qwen3-Coder-Next-REAP-40B-A3B.i1-IQ3_M",
        [
            run(32768, measured=samples([100, 101, 99], [22.4, 22.5, 22.3]), memory=gpus(9.4, 8.8)),
            run(65536, measured=samples([56, 57, 55], [22.4, 22.6, 22.2]), memory=gpus(9.6, 8.9)),
            run(131072, measured=samples([69.5], [22.5]), memory=gpus(10.1, 9.2)),
            run(262144, "not_stable", reason="exited with status 1: out of memory"),
        ],
        started_at="2026-02-14T01:02:03+00:00",
    )


def q2() -> BenchRecord:
    at_depth = samples([80, 81, 79], [20.0, 20.1, 19.9], depth=4096)
    return record(
        "Qwen3-Coder-Next-REAP-40B-A3B-Q2_K_XL",
        [
            # PP +20 %, far beyond a spread of 1 tok/s; TG 0.1 % apart within a spread of 0.15.
            run(
                32768,
                measured=samples([120, 121, 119], [22.3, 22.6, 22.4]) + at_depth,
                memory=gpus(9.9, 9.2),
            ),
            run(65536, measured=samples([56.5, 57, 56], [21, 21.1, 20.9]), memory=gpus(10.0, 9.3)),
            run(131072, measured=samples([72], [21]), memory=gpus(10.4, 9.6)),
            run(196608, measured=samples([85, 86, 84], [21, 21, 21]), memory=gpus(10.9, 9.9)),
            run(262144, measured=samples([67, 68, 66], [21, 21.2, 20.8]), memory=gpus(11.4, 10.1)),
        ],
        # In another zone: the header gives every start in UTC.
        started_at="2026-02-07T23:30:00-02:00",
    )


def stats(mean: float, sd: float | None, n: int) -> TestStats:
    return TestStats(name="pp512", kind="prompt", depth=0, tokens=PP, n=n, mean=mean, sd=sd)


def test_golden_comparison() -> None:
    check_golden("bench_compare.md", compare_markdown(iq3(), q2()))


RECORDED = Path(__file__).parent / "fixtures" / "bench"


def test_golden_comparison_of_two_recorded_benches() -> None:
    """Two real `bench` runs of the tiny model on 2 CPU cores: f16 against q8_0 KV cache."""
    f16 = load(RECORDED / "tiny-kv-f16.json")
    q8 = load(RECORDED / "tiny-kv-q8_0.json")
    text = compare_markdown(f16, q8)
    check_golden("bench_compare_recorded.md", text)
    # q8_0 stores a cell in 34 bytes per 32 values where f16 takes 64: the cache shrinks to 53 %.
    kv_f16, kv_q8 = (r.runs[0].kv for r in (f16, q8))
    assert kv_f16 is not None and kv_q8 is not None and kv_f16.bytes and kv_q8.bytes
    assert kv_q8.bytes / kv_f16.bytes == pytest.approx(34 / 64)


def test_saved_and_loaded_records_compare_the_same(tmp_path: Path) -> None:
    a, b = iq3(), q2()
    a.save(tmp_path / "a.json")
    b.save(tmp_path / "b.json")
    loaded = compare_markdown(load(tmp_path / "a.json"), load(tmp_path / "b.json"))
    assert loaded == compare_markdown(a, b)


def table(text: str) -> list[list[str]]:
    """The comparison table's header and rows, as stripped cells; the rule line left out."""
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]] for line in lines]


def test_rows_pair_by_context_and_say_what_is_missing() -> None:
    rows = [row for row in table(compare_markdown(iq3(), q2())) if row[0] == "192k"]
    assert [row[1] for row in rows] == [
        "Qwen3-Coder-Next-REAP-40B-A3B.i1-IQ3_M",
        "Qwen3-Coder-Next-REAP-40B-A3B-Q2_K_XL",
        "B vs A",
    ]
    assert rows[0][-1] == "not measured"
    assert rows[1][2:4] == ["85.00 ± 1.00", "21.00 ± 0.00"]
    assert rows[2][-1] == "not comparable"


def test_a_run_that_is_not_stable_shows_its_status_not_figures() -> None:
    partial = samples([1, 2], [3, 4])
    a = record(
        "a",
        [run(32768, "probe_failed", measured=partial, memory=gpus(1, 1), reason="tg: HTTP 500")],
        started_at="x",
    )
    b = record("b", [run(32768, measured=partial, memory=gpus(1, 1))], started_at="y")
    assert table(compare_markdown(a, b)) == [
        [
            "Context",
            "Run",
            "pp512 (tok/s)",
            "tg128 (tok/s)",
            "VRAM (GiB)",
            "KV cache (MiB)",
            "Status",
        ],
        ["32k", "a", "—", "—", "—", "—", "⚠️ Probe failed: tg: HTTP 500"],
        ["32k", "b", "1.50 ± 0.71", "3.50 ± 0.71", "2.00", "n/a", "✅ Stable"],
        ["32k", "B vs A", "—", "—", "—", "—", "not comparable"],
    ]


def test_two_runs_with_one_context_are_both_kept() -> None:
    a = record("a", [run(4096, measured=samples([10], [5]))] * 2, started_at="x")
    b = record("b", [run(4096, measured=samples([11], [5]))], started_at="y")
    rows = table(compare_markdown(a, b))[1:]
    assert [(row[0], row[1], row[-1]) for row in rows] == [
        ("4k", "a", "✅ Stable"),
        ("4k", "b", "✅ Stable"),
        ("4k", "B vs A", ""),
        ("4k #2", "a", "✅ Stable"),
        ("4k #2", "b", "not measured"),
        ("4k #2", "B vs A", "not comparable"),
    ]


def test_equal_labels_name_the_runs_a_and_b() -> None:
    text = compare_markdown(iq3(), iq3())
    assert text.startswith(
        "## Comparison: A (Qwen3-Coder-Next-REAP-40B-A3B.i1-IQ3_M)"
        " vs B (Qwen3-Coder-Next-REAP-40B-A3B.i1-IQ3_M)\n"
    )
    assert "- A: **A (Qwen3-Coder-Next-REAP-40B-A3B.i1-IQ3_M)** (`Qwen3" in text
    # Identical runs: no change, and the t-test finds none.
    differences = [row for row in table(text) if row[1] == "B vs A"]
    assert differences[0][2:5] == ["+0.0 % (within noise)", "+0.0 % (within noise)", "+0.00"]
    assert not any("significant" in cell for row in differences for cell in row)


def test_explicit_names_replace_the_labels() -> None:
    text = compare_markdown(iq3(), q2(), name_a="IQ3_M", name_b="Q2_K_XL")
    assert [row[1] for row in table(text)[1:4]] == ["IQ3_M", "Q2_K_XL", "B vs A"]
    assert (
        "- A: **IQ3_M** (`Qwen3-Coder-Next-REAP-40B-A3B.i1-IQ3_M`), llama.cpp build b11434" in text
    )
    assert "- B: **Q2_K_XL** (`Qwen3-Coder-Next-REAP-40B-A3B-Q2_K_XL`)" in text


def test_start_times_read_in_utc_and_unparsable_ones_as_written() -> None:
    naive = record("a", [], started_at="2026-02-14T01:02:03")
    odd = record("b", [], started_at="yesterday")
    text = compare_markdown(naive, odd)
    assert "started 2026-02-14 01:02 UTC, launch mode" in text
    assert "started yesterday, launch mode" in text


def test_memory_falls_back_to_rss_without_gpu_figures() -> None:
    a = record("cpu-a", [run(4096, measured=samples([10], [5]), rss=3 * GIB)], started_at="x")
    b = record("cpu-b", [run(4096, measured=samples([10], [5]), rss=GIB // 2)], started_at="y")
    rows = table(compare_markdown(a, b))
    assert rows[0][-3] == "RSS (GiB)"
    assert [row[-3] for row in rows[1:]] == ["3.00", "0.50", "-2.50"]


def test_memory_is_not_available_without_gpu_or_rss_in_both() -> None:
    a = record("cpu-a", [run(4096, measured=samples([10], [5]), rss=GIB)], started_at="x")
    b = record("cpu-b", [run(4096, measured=samples([10], [5]))], started_at="y")
    rows = table(compare_markdown(a, b))
    assert rows[0][-3] == "VRAM (GiB)"
    assert [row[-3] for row in rows[1:]] == ["n/a", "n/a", "—"]


def test_neither_file_with_a_run() -> None:
    empty = record("empty", [], started_at="2026-01-01T00:00:00Z")
    assert "Neither file has a run." in compare_markdown(empty, empty)


@pytest.mark.parametrize(
    ("n_ctx", "label"),
    [(32768, "32k"), (1024, "1k"), (196608, "192k"), (1000, "1,000"), (1536, "1,536"), (0, "0")],
)
def test_context_label(n_ctx: int, label: str) -> None:
    assert ctx_label(n_ctx) == label


def test_a_clear_difference_is_significant() -> None:
    assert verdict(stats(100, 1, 3), stats(120, 1, 3)) == "significant"


def test_a_difference_inside_the_spread_is_within_noise() -> None:
    assert verdict(stats(22.4, 0.1, 3), stats(22.43, 0.15, 3)) == "within noise"


def test_a_single_repetition_leaves_the_noise_unknown() -> None:
    assert verdict(stats(69.5, None, 1), stats(72, 1, 3)) == "noise unknown"
    assert verdict(stats(72, 1, 3), stats(69.5, None, 1)) == "noise unknown"


def test_relative_change() -> None:
    assert relative_change_percent(100, 120) == pytest.approx(20.0)
    assert relative_change_percent(100, 90) == pytest.approx(-10.0)
    assert relative_change_percent(0, 5) is None


def test_a_pipe_in_a_reason_does_not_split_its_cell() -> None:
    a = record("a", [run(4096, "not_stable", reason="exit 1 | oom")], started_at="x")
    b = record("b", [run(4096, measured=samples([11], [5]))], started_at="y")
    assert table(compare_markdown(a, b))[1][-1] == "❌ Not stable: exit 1 \\| oom"


# --- host load: a disturbed run's differences are flagged, its statistics unchanged ---

QUIET = HostLoadRecord(seconds=60.0, cores=2, steal_percent=0.0, other_cpu_seconds=1.2)
# The field report: a compile on the same 2 cores during one of two identical runs.
BUSY = HostLoadRecord(seconds=60.0, cores=2, steal_percent=0.4, other_cpu_seconds=78.0)
STOLEN = HostLoadRecord(seconds=60.0, cores=8, steal_percent=12.5, other_cpu_seconds=0.0)


def identical_pair(
    load_a: HostLoadRecord | None, load_b: HostLoadRecord | None
) -> tuple[str, dict[str, Any]]:
    """Two runs of one configuration; the first reads a quarter of the speed, as under load."""
    slow = run(4096, measured=samples([25, 24, 26], [5.0, 5.1, 4.9]))
    fast = run(4096, measured=samples([106, 105, 107], [20.0, 20.1, 19.9]))
    a = record("same", [slow.model_copy(update={"host_load": load_a})], started_at="x")
    b = record("same", [fast.model_copy(update={"host_load": load_b})], started_at="y")
    return compare_markdown(a, b), compare_data(a, b)


def test_a_difference_against_a_disturbed_run_is_untrustworthy() -> None:
    text, _ = identical_pair(BUSY, QUIET)
    rows = table(text)
    a_row, b_row, difference = rows[1], rows[2], rows[3]
    # The statistics are as they were: +324 % is still beyond the noise...
    assert difference[2] == "+324.0 % (significant, untrustworthy)"
    assert difference[3].endswith("(significant, untrustworthy)")
    # ...but the row names the disturbed run, and the run says it was.
    assert difference[-1] == "⚠️ disturbed: A"
    assert a_row[-1] == "✅ Stable, ⚠️ disturbed"
    assert b_row[-1] == "✅ Stable"
    warning = text.split("**⚠️ Disturbed by host load**", 1)[1]
    assert "- 4k, A (A (same)): other processes used 1.30 cores on average (65 % of 2" in warning


def test_steal_disturbs_too_and_both_runs_are_named() -> None:
    text, _ = identical_pair(BUSY, STOLEN)
    assert table(text)[3][-1] == "⚠️ disturbed: A and B"
    assert "- 4k, B (B (same)): CPU steal 12.5 % (limit 5 %)" in text


@pytest.mark.parametrize(("load_a", "load_b"), [(QUIET, QUIET), (None, None), (QUIET, None)])
def test_quiet_or_unrecorded_runs_are_compared_as_before(
    load_a: HostLoadRecord | None, load_b: HostLoadRecord | None
) -> None:
    text, _ = identical_pair(load_a, load_b)
    assert "untrustworthy" not in text
    assert "disturbed" not in text
    assert table(text)[3][2] == "+324.0 % (significant)"


def test_the_json_comparison_flags_the_disturbed_run_and_why() -> None:
    _, data = identical_pair(BUSY, QUIET)
    assert data["schema"] == COMPARE_SCHEMA
    assert data["limits"] == {"other_cores": 0.25, "steal_percent": 5.0}
    (context,) = data["contexts"]
    assert context["context"] == 4096
    assert context["comparable"] is True
    assert context["trustworthy"] is False
    assert context["disturbed"] == [
        {
            "run": "A",
            "name": "A (same)",
            "why": ["other processes used 1.30 cores on average (65 % of 2; limit 0.25)"],
        }
    ]
    assert context["a"]["host_load"]["other_cpu_seconds"] == 78.0
    assert context["b"]["disturbed"] == []
    pp = context["tests"][0]
    assert pp["test"] == "pp512"
    assert pp["verdict"] == "significant"
    assert pp["change_percent"] == pytest.approx(324.0)
    assert pp["a"] == {"mean": pytest.approx(25.0), "sd": pytest.approx(1.0), "n": 3}


def test_the_json_comparison_pairs_as_the_table_does() -> None:
    data = compare_data(iq3(), q2())
    contexts = {(c["context"], c["occurrence"]): c for c in data["contexts"]}
    assert sorted(contexts) == [(32768, 1), (65536, 1), (131072, 1), (196608, 1), (262144, 1)]
    assert contexts[(32768, 1)]["trustworthy"] is True
    assert contexts[(32768, 1)]["memory"]["figure"] == "VRAM (GiB)"
    assert contexts[(196608, 1)]["a"] is None
    assert contexts[(196608, 1)]["comparable"] is False
    assert all(t["verdict"] is None for t in contexts[(196608, 1)]["tests"])
    oom = contexts[(262144, 1)]
    assert oom["a"]["status"] == "not_stable"
    assert oom["memory"]["difference_bytes"] is None
    verdicts = [t["verdict"] for t in contexts[(65536, 1)]["tests"] if t["verdict"]]
    assert verdicts == ["within noise", "significant"]
