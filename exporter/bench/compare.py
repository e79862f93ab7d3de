"""`bench compare`: two bench results side by side, as the comparison table of a hand-made report.

Rows are paired by context (`run.context`: the -c a launched server was given, else the server's
context per slot) and columns by test
(kind, tokens and depth, in llama-bench's order). Each context gets a row per run and a row with
B's difference from A: relative for each speed, with whether Welch's t-test at 95 % over the
repetitions puts it beyond their noise, and absolute, in GiB, for memory.

Only stable runs show figures: the others show their status and reason, because a partial or
failing run's figures do not measure what a stable one does. A context that one file lacks
shows "not measured" for it; a file with two runs of one context keeps both, the second as
"32k #2". "—" marks a figure that does not exist.

The memory column is the VRAM used on all GPUs together, as nvidia-smi shows it
(`vram_used_bytes`), when any stable run of either file has it; runs without it show "n/a".
When no stable run has GPU figures (no NVML: CPU only, or another vendor's GPU) but both files
have the server's resident memory, the column is "RSS (GiB)" instead: the closest figure to what
the model costs there. Otherwise it stays "VRAM (GiB)", all "n/a".

A run that host load disturbed (`HostLoadRecord.disturbed`: other processes' CPU time or steal
past their limits) keeps its figures and its verdicts, since the statistics are the same, but each
difference on its row reads "untrustworthy", the row's status names the disturbed run, and a
list under the table says why. Runs recorded without host load are not judged.

When either file measured quality (`--quality-text`), a Quality column shows each run's mean KL
divergence and PPL, and the "B vs A" row their differences with a z-test on llama-perplexity's
± (`exporter.bench.quality_figures`); a last sentence answers the owner's question, faster and
better or not (`exporter.bench.goal`). Quality is measured apart from the server, so it shows
beside a run that did not load too. Without quality the table is as it always was.

Contexts read "32k" when they are a whole number of 1024 tokens (how -c values are given) and
with thousands separators otherwise ("1,000"). The output depends on the records only, so it can
be compared with a golden file. `compare_data` is the same comparison as JSON-ready data.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal

from exporter.bench.goal import goal_data, goal_sentence, quality_data
from exporter.bench.quality_figures import (
    change_cell,
    compare_kld,
    compare_ppl,
    compare_quality,
    short_cell,
)
from exporter.bench.record import (
    OTHER_CORES_LIMIT,
    STATUS_TEXT,
    STEAL_PERCENT_LIMIT,
    BenchRecord,
    RunRecord,
)
from exporter.bench.report import DISTURBED
from exporter.bench.stats import differs
from exporter.bench.units import GIB, MIB, ctx_label, speed
from exporter.probe.results import Kind
from exporter.probe.stats import TestStats, test_name

ABSENT: Final = "—"
UNTRUSTWORTHY: Final = "untrustworthy"
COMPARE_SCHEMA: Final = "llama-speed-exporter/bench-compare/v1"

Verdict = Literal["significant", "within noise", "noise unknown"]
# (depth, is generation, tokens): sorting by it gives llama-bench's order, pp before tg per depth.
TestKey = tuple[int, bool, int]
# (n_ctx, occurrence): a file may hold two runs with the same context; neither is dropped.
ContextKey = tuple[int | None, int]

LEGEND: Final = (
    "Speeds: mean ± sample standard deviation of tokens per second over the repetitions, "
    "(n=1) for a single one; — where a run has no such figure. B vs A: B's speed relative to "
    "A's, *significant* when Welch's t-test over the repetitions rejects equal means at 95 %, "
    "*within noise* when it does not, *noise unknown* when a run has a single repetition; "
    "memory and KV cache: B minus A, in their columns' units."
)
QUALITY_LEGEND: Final = (
    "Quality: mean KL divergence from the baseline (KLD, lower is better) and perplexity of the "
    "text (PPL), each ± its standard error as llama-perplexity prints it. B vs A: B's KLD minus "
    "A's when both were measured against the same baseline, else PPL's relative change over "
    "the same tokens; *significant* when the difference exceeds 1.96 × √(e_A² + e_B²)."
)


def verdict(a: TestStats, b: TestStats) -> Verdict:
    """Whether b's mean differs from a's beyond the repetitions' noise, in the table's words."""
    differ = differs(a, b)
    if differ is None:
        return "noise unknown"
    return "significant" if differ else "within noise"


def relative_change_percent(a: float, b: float) -> float | None:
    return (b - a) / a * 100 if a else None


def compare_markdown(
    a: BenchRecord, b: BenchRecord, *, name_a: str | None = None, name_b: str | None = None
) -> str:
    na, nb = _names(a, b, name_a, name_b)
    runs_a, runs_b = _by_context(a.runs), _by_context(b.runs)
    tests = _test_columns(a, b)
    memory = [_memory_column(a, b), _KV_COLUMN]
    quality = _has_quality(a, b)
    header = [
        "Context",
        "Run",
        *(f"{_test_title(key)} (tok/s)" for key in tests),
        *(m.title for m in memory),
        *(["Quality"] if quality else []),
        "Status",
    ]
    rows: list[list[str]] = []
    warnings: list[str] = []
    for key in sorted(runs_a.keys() | runs_b.keys(), key=_context_order):
        ra, rb = runs_a.get(key), runs_b.get(key)
        ctx = _context_cell(key)
        rows.append([ctx, na, *_with_quality(_run_cells(ra, tests, memory), quality, ra)])
        rows.append([ctx, nb, *_with_quality(_run_cells(rb, tests, memory), quality, rb)])
        difference = _difference_cells(ra, rb, tests, memory)
        rows.append([ctx, "B vs A", *_with_quality_change(difference, quality, ra, rb)])
        warnings += [
            f"- {ctx}, {side} ({name}): {'; '.join(run.disturbed)}"
            for side, name, run in (("A", na, ra), ("B", nb, rb))
            if run is not None and run.disturbed
        ]
    body = _table(header, rows) if rows else "Neither file has a run."
    parts = [
        f"## Comparison: {na} vs {nb}",
        f"- A: {_describe(na, a)}\n- B: {_describe(nb, b)}",
        body,
        LEGEND,
    ]
    if quality:
        parts += [QUALITY_LEGEND, goal_sentence(_pairs(runs_a, runs_b), a, b, na, nb)]
    if warnings:
        parts.append(
            "**⚠️ Disturbed by host load**: on these runs other processes or the hypervisor took "
            f"CPU time past the limits (other processes {OTHER_CORES_LIMIT:g} cores on average, "
            f"steal {STEAL_PERCENT_LIMIT:g} %), so their differences are *untrustworthy*, "
            "however significant: measure them again on a quiet host.\n\n" + "\n".join(warnings)
        )
    return "\n\n".join(parts) + "\n"


def compare_data(
    a: BenchRecord, b: BenchRecord, *, name_a: str | None = None, name_b: str | None = None
) -> dict[str, Any]:
    """The comparison as data for `bench compare --format json`: the same pairs and verdicts."""
    na, nb = _names(a, b, name_a, name_b)
    runs_a, runs_b = _by_context(a.runs), _by_context(b.runs)
    tests = _test_columns(a, b)
    memory = _memory_column(a, b)
    contexts = []
    for key in sorted(runs_a.keys() | runs_b.keys(), key=_context_order):
        ra, rb = runs_a.get(key), runs_b.get(key)
        comparable = _comparable(ra, rb)
        disturbed = [
            {"run": side, "name": name, "why": list(run.disturbed)}
            for side, name, run in (("A", na, ra), ("B", nb, rb))
            if run is not None and run.disturbed
        ]
        contexts.append(
            {
                "context": key[0],
                "occurrence": key[1] + 1,
                "a": _run_data(ra),
                "b": _run_data(rb),
                "comparable": comparable,
                "tests": [_test_data(k, ra, rb, comparable) for k in tests],
                "memory": _memory_data(memory, ra, rb, comparable),
                "kv_cache": _memory_data(_KV_COLUMN, ra, rb, comparable),
                "disturbed": disturbed,
                "trustworthy": comparable and not disturbed,
            }
        )
        if _has_quality(a, b):
            contexts[-1]["quality"] = _quality_pair_data(ra, rb)
    data: dict[str, Any] = {
        "schema": COMPARE_SCHEMA,
        "a": _record_data(na, a),
        "b": _record_data(nb, b),
        "limits": {
            "other_cores": OTHER_CORES_LIMIT,
            "steal_percent": STEAL_PERCENT_LIMIT,
        },
        "contexts": contexts,
    }
    if _has_quality(a, b):
        data["goal"] = goal_data(_pairs(runs_a, runs_b), a, b, na, nb)
    return data


def _has_quality(a: BenchRecord, b: BenchRecord) -> bool:
    """Whether either bench measured quality: only then has the table a Quality column."""
    return any(run.quality is not None for run in (*a.runs, *b.runs))


def _pairs(
    runs_a: dict[ContextKey, RunRecord], runs_b: dict[ContextKey, RunRecord]
) -> list[tuple[RunRecord, RunRecord]]:
    shared = sorted(runs_a.keys() & runs_b.keys(), key=_context_order)
    return [(runs_a[key], runs_b[key]) for key in shared]


def _with_quality(cells: list[str], quality: bool, run: RunRecord | None) -> list[str]:
    # Measured apart from the server: shown whatever the run's speed status.
    if not quality:
        return cells
    cell = short_cell(run.quality) if run is not None else ABSENT
    return [*cells[:-1], cell, cells[-1]]


def _with_quality_change(
    cells: list[str], quality: bool, ra: RunRecord | None, rb: RunRecord | None
) -> list[str]:
    if not quality:
        return cells
    cell = change_cell(ra.quality, rb.quality) if ra is not None and rb is not None else ABSENT
    return [*cells[:-1], cell, cells[-1]]


def _quality_pair_data(ra: RunRecord | None, rb: RunRecord | None) -> dict[str, Any]:
    qa = ra.quality if ra is not None else None
    qb = rb.quality if rb is not None else None
    return {
        "a": qa.model_dump(mode="json", exclude={"log_lines"}) if qa is not None else None,
        "b": qb.model_dump(mode="json", exclude={"log_lines"}) if qb is not None else None,
        # The figure that judges quality (KLD from one baseline, else PPL), then each alone.
        "figure": compare_quality(qa, qb).figure,
        "kld": quality_data(compare_kld(qa, qb)),
        "ppl": quality_data(compare_ppl(qa, qb)),
    }


def _record_data(name: str, record: BenchRecord) -> dict[str, Any]:
    return {
        "name": name,
        "label": record.label,
        "llama_cpp_build": record.llama_cpp_build,
        "started_at": record.started_at,
        "mode": record.mode,
        "interrupted": record.interrupted,
    }


def _run_data(run: RunRecord | None) -> dict[str, Any] | None:
    if run is None:
        return None
    return {
        "status": run.status,
        "reason": run.reason,
        "host_load": run.host_load.model_dump(mode="json") if run.host_load else None,
        "disturbed": list(run.disturbed),
    }


def _test_data(
    key: TestKey, ra: RunRecord | None, rb: RunRecord | None, comparable: bool
) -> dict[str, Any]:
    # Figures of stable runs only, as in the table: the others do not measure the same thing.
    sa = _tests_of(ra).get(key) if ra is not None and ra.status == "stable" else None
    sb = _tests_of(rb).get(key) if rb is not None and rb.status == "stable" else None
    change: float | None = None
    judged: Verdict | None = None
    if comparable and sa is not None and sb is not None:
        change, judged = relative_change_percent(sa.mean, sb.mean), verdict(sa, sb)
    return {
        "test": _test_title(key),
        "a": _stats_data(sa),
        "b": _stats_data(sb),
        "change_percent": change,
        "verdict": judged,
    }


def _stats_data(stats: TestStats | None) -> dict[str, Any] | None:
    return None if stats is None else {"mean": stats.mean, "sd": stats.sd, "n": stats.n}


def _memory_data(
    memory: _Memory, ra: RunRecord | None, rb: RunRecord | None, comparable: bool
) -> dict[str, Any]:
    va = memory.bytes_of(ra) if ra is not None and ra.status == "stable" else None
    vb = memory.bytes_of(rb) if rb is not None and rb.status == "stable" else None
    difference = vb - va if comparable and va is not None and vb is not None else None
    return {"figure": memory.title, "a_bytes": va, "b_bytes": vb, "difference_bytes": difference}


@dataclass(frozen=True)
class _Memory:
    title: str
    bytes_of: Callable[[RunRecord], int | None]
    unit: int = GIB
    digits: int = 2

    def cell(self, run: RunRecord) -> str:
        value = self.bytes_of(run)
        return "n/a" if value is None else f"{value / self.unit:.{self.digits}f}"

    def difference(self, a: RunRecord, b: RunRecord) -> str:
        va, vb = self.bytes_of(a), self.bytes_of(b)
        return ABSENT if va is None or vb is None else _signed((vb - va) / self.unit, self.digits)


# What a cache-type or context change is about: the KV cache the server allocates.
_KV_COLUMN: Final = _Memory(
    "KV cache (MiB)", lambda run: run.kv.bytes if run.kv else None, unit=MIB, digits=1
)


def _names(
    a: BenchRecord, b: BenchRecord, name_a: str | None, name_b: str | None
) -> tuple[str, str]:
    na, nb = name_a or a.label, name_b or b.label
    if na == nb:
        # Equal names would make the rows, and which way a difference goes, unreadable.
        return f"A ({na})", f"B ({nb})"
    return na, nb


def _describe(name: str, record: BenchRecord) -> str:
    named = f"**{name}**" if name == record.label else f"**{name}** (`{record.label}`)"
    text = (
        f"{named}, llama.cpp build {record.llama_cpp_build}, "
        f"started {_when(record.started_at)}, {record.mode} mode"
    )
    return text + ", interrupted" if record.interrupted else text


def _when(iso: str) -> str:
    try:
        when = datetime.fromisoformat(iso)
    except ValueError:
        return iso
    if when.tzinfo is not None:
        when = when.astimezone(UTC)
    return when.strftime("%Y-%m-%d %H:%M UTC")


def _by_context(runs: Sequence[RunRecord]) -> dict[ContextKey, RunRecord]:
    seen: dict[int | None, int] = {}
    out: dict[ContextKey, RunRecord] = {}
    for run in runs:
        occurrence = seen.get(run.context, 0)
        seen[run.context] = occurrence + 1
        out[(run.context, occurrence)] = run
    return out


def _context_order(key: ContextKey) -> tuple[bool, int, int]:
    n_ctx, occurrence = key
    return (n_ctx is None, n_ctx or 0, occurrence)


def _context_cell(key: ContextKey) -> str:
    n_ctx, occurrence = key
    label = ctx_label(n_ctx)
    return f"{label} #{occurrence + 1}" if occurrence else label


def _stable(record: BenchRecord) -> list[RunRecord]:
    return [run for run in record.runs if run.status == "stable"]


def _tests_of(run: RunRecord) -> dict[TestKey, TestStats]:
    return {(t.depth, t.kind != "prompt", t.tokens): t for t in run.tests}


def _test_columns(a: BenchRecord, b: BenchRecord) -> list[TestKey]:
    keys = {key for run in (*_stable(a), *_stable(b)) for key in _tests_of(run)}
    return sorted(keys)


def _test_title(key: TestKey) -> str:
    depth, generation, tokens = key
    kind: Kind = "generation" if generation else "prompt"
    return test_name(kind, tokens, depth)


def _memory_column(a: BenchRecord, b: BenchRecord) -> _Memory:
    stable_a, stable_b = _stable(a), _stable(b)
    no_gpu = all(run.vram_used_bytes is None for run in (*stable_a, *stable_b))
    if no_gpu and all(
        any(run.server_rss_bytes is not None for run in runs) for runs in (stable_a, stable_b)
    ):
        return _Memory("RSS (GiB)", lambda run: run.server_rss_bytes)
    return _Memory("VRAM (GiB)", lambda run: run.vram_used_bytes)


def _run_cells(run: RunRecord | None, tests: list[TestKey], memory: list[_Memory]) -> list[str]:
    blanks = [ABSENT] * (len(tests) + len(memory))
    if run is None:
        return [*blanks, "not measured"]
    if run.status != "stable":
        status = STATUS_TEXT[run.status]
        return [*blanks, f"{status}: {run.reason}" if run.reason else status]
    measured = _tests_of(run)
    speeds = [_speed(measured.get(key)) for key in tests]
    status = STATUS_TEXT["stable"] + (f", {DISTURBED}" if run.disturbed else "")
    return [*speeds, *(m.cell(run) for m in memory), status]


def _comparable(ra: RunRecord | None, rb: RunRecord | None) -> bool:
    return ra is not None and rb is not None and ra.status == rb.status == "stable"


def _difference_cells(
    ra: RunRecord | None, rb: RunRecord | None, tests: list[TestKey], memory: list[_Memory]
) -> list[str]:
    if ra is None or rb is None or not _comparable(ra, rb):
        return [*([ABSENT] * (len(tests) + len(memory))), "not comparable"]
    sides = [side for side, run in (("A", ra), ("B", rb)) if run.disturbed]
    ta, tb = _tests_of(ra), _tests_of(rb)
    speeds = [_speed_difference(ta.get(key), tb.get(key), trusted=not sides) for key in tests]
    status = f"{DISTURBED}: {' and '.join(sides)}" if sides else ""
    return [*speeds, *(m.difference(ra, rb) for m in memory), status]


def _speed(stats: TestStats | None) -> str:
    return ABSENT if stats is None else speed(stats)


def _speed_difference(a: TestStats | None, b: TestStats | None, *, trusted: bool) -> str:
    if a is None or b is None:
        return ABSENT
    judged = verdict(a, b) + ("" if trusted else f", {UNTRUSTWORTHY}")
    change = relative_change_percent(a.mean, b.mean)
    if change is None:
        return f"n/a ({judged})"
    return f"{_signed(change, 1)} % ({judged})"


def _signed(value: float, digits: int) -> str:
    # Adding 0.0 turns the -0.0 that rounding a tiny loss gives into 0.0: "+0.0", never "-0.0".
    return f"{round(value, digits) + 0.0:+.{digits}f}"


def _escape(cell: str) -> str:
    return cell.replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[str]]) -> str:
    grid = [[_escape(cell) for cell in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in grid) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(grid[0]), rule, *(line(row) for row in grid[1:])])
