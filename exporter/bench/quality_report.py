"""The quality parts of a bench's Markdown report: a header line, and a section per run.

Rendered from the record only (`QualityRecord`, `QualityBaselineRecord`), like the rest of the
report, so that `bench report` writes the same figures from the JSON.
"""

from __future__ import annotations

import shlex
from pathlib import PurePath
from typing import Final

from exporter.bench.kld_file import scored_tokens
from exporter.bench.quality_figures import kld_text, percent_text, ppl_text, ratio_text
from exporter.bench.record import (
    BenchRecord,
    QualityBaselineRecord,
    QualityRecord,
    QualityStatus,
    RunRecord,
)
from exporter.bench.units import size
from exporter.llama.redact import redacted, redacted_text

QUALITY_STATUS_TEXT: Final[dict[QualityStatus, str]] = {
    "measured": "✅ Measured",
    "failed": "❌ Failed",
    "interrupted": "⏹️ Interrupted",
}


def quality_header(record: BenchRecord) -> list[tuple[str, str]]:
    """The report header's quality lines: what was measured over what, against what."""
    quality = next((r.quality for r in record.runs if r.quality is not None), None)
    baseline = record.quality_baseline
    lines = []
    if quality is not None:
        what = "PPL"
        if quality.mode == "kl_divergence" and quality.baseline_model:
            what = f"KL divergence from `{quality.baseline_model}` and PPL"
        over = f"over `{quality.text}` (sha256 {quality.text_sha256[:12]}…)"
        lines.append(("Quality", f"{what} {over}, llama-perplexity -c {quality.ctx}"))
    if baseline is not None:
        lines.append(("Quality baseline", _baseline_text(baseline)))
    return lines


def _baseline_text(baseline: QualityBaselineRecord) -> str:
    name = f"`{baseline.model}`" if baseline.model else "an earlier bench's"
    if baseline.status in ("failed", "interrupted"):
        word = "❌ failed" if baseline.status == "failed" else "⏹️ interrupted"
        return f"{name}: {word}: {redacted_text(baseline.reason)}; PPL only"
    if baseline.model_bytes is not None:
        name += f" ({size(baseline.model_bytes)})"
    parts = [name]
    if baseline.ppl is not None:
        parts.append(f"PPL {ppl_text(baseline.ppl)}")
    file = PurePath(baseline.logits_file).name
    reused = ", reused" if baseline.status == "reused" else ""
    held = f", {size(baseline.logits_bytes)}" if baseline.logits_bytes is not None else ""
    chunks = f"{baseline.n_chunk} chunks" if baseline.n_chunk is not None else "chunks"
    parts.append(f"distributions of {chunks} of {baseline.ctx} tokens in `{file}`{held}{reused}")
    return "; ".join(parts)


def quality_section(number: int, run: RunRecord) -> list[str]:
    """The `#### Quality` part of a run's section; nothing when it was not asked for."""
    quality = run.quality
    if quality is None:
        return []
    rows = _figure_rows(quality)
    if quality.chunks is not None:
        scored = quality.chunks * scored_tokens(quality.ctx)
        chunks = f"{quality.chunks} chunks of {quality.ctx} ({scored:,} scored)"
        rows.append(("Tokens", f"{chunks} of `{quality.text}`"))
    if quality.seconds is not None:
        rows.append(("Time", f"{quality.seconds:.1f} s"))
    rows.append(("Status", QUALITY_STATUS_TEXT[quality.status]))
    lines = ["", "#### Quality", "", "| Metric | Value |", "|--------|-------|"]
    lines += [f"| **{key}** | {value} |" for key, value in rows]
    notes = _notes(number, quality)
    if notes:
        lines += ["", *(f"- {note}" for note in notes)]
    if quality.log_lines:
        shown = [redacted_text(line) for line in quality.log_lines]
        lines += ["", "Last llama-perplexity lines:", "", "```", *shown, "```"]
    return lines


def _figure_rows(quality: QualityRecord) -> list[tuple[str, str]]:
    rows = []
    if quality.kld is not None:
        rows.append(("Mean KLD", kld_text(quality.kld)))
    median, p99, top = quality.kld_median, quality.kld_p99, quality.kld_max
    if median is not None and p99 is not None and top is not None:
        rows.append(("KLD median / 99 % / max", f"{median:.6f} / {p99:.6f} / {top:.6f}"))
    if quality.same_top_percent is not None:
        rows.append(("Same top token", percent_text(quality.same_top_percent)))
    if quality.ppl is not None:
        rows.append(("PPL", ppl_text(quality.ppl)))
    if quality.ppl_base is not None:
        rows.append(("PPL of the baseline", ppl_text(quality.ppl_base)))
    if quality.ppl_ratio is not None:
        rows.append(("PPL ratio to the baseline", ratio_text(quality.ppl_ratio)))
    return rows


def _notes(number: int, quality: QualityRecord) -> list[str]:
    notes = []
    if quality.status != "measured" and quality.reason:
        notes.append(redacted_text(quality.reason))
    if quality.measured_in_run is not None and quality.measured_in_run != number:
        notes.append(
            f"measured once for the bench, after run {quality.measured_in_run}: "
            "llama-perplexity's context is --quality-ctx, not the run's -c"
        )
    if quality.dropped_options:
        dropped = ", ".join(f"`{name}`" for name in quality.dropped_options)
        notes.append(
            f"left out of the llama-perplexity command (it does not take them, or the bench "
            f"sets them): {dropped}"
        )
    if quality.command:
        notes.append(f"command: `{shlex.join(redacted(quality.command))}`")
    if quality.log_file and quality.status != "measured":
        notes.append(f"full llama-perplexity log: `{quality.log_file}`")
    return notes
