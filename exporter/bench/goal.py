"""The owner's question about two benches, answered in one sentence: is B faster, is it better?

"Test whether IQ (imatrix) quants deliver better quality without speed penalty vs. standard K
quants" asks two things of B against A:

- **faster or not**: every test (PP and TG, at each depth) of every context both ran stably,
  judged as `bench compare` judges it (Welch's t-test at 95 % over the repetitions), counted
  as significantly faster, significantly slower, within noise, or of unknown noise;
- **better quality or not**: the bench's quality (`exporter.bench.quality_figures`): mean KL
  divergence from the same baseline, else PPL over the same tokens, lower being better,
  significant by the z-test on the ± llama-perplexity prints.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from exporter.bench.quality_figures import (
    QualityComparison,
    compare_quality,
    kld_text,
    ppl_text,
)
from exporter.bench.record import BenchRecord, Estimate, QualityRecord, RunRecord
from exporter.bench.stats import differs


@dataclass(frozen=True)
class SpeedTally:
    """How B's speed compares with A's over every test of every comparable context."""

    faster: int = 0  # significantly
    slower: int = 0  # significantly
    within_noise: int = 0
    unknown: int = 0  # a single repetition: no spread to judge by
    disturbed: bool = False  # a pair ran under host load: its verdicts are untrustworthy

    @property
    def total(self) -> int:
        return self.faster + self.slower + self.within_noise + self.unknown

    def phrase(self) -> str:
        n = self.total
        if n == 0:
            return "its speed was not compared (no context ran stably in both)"
        # Said inside the counts: the verdict stands, its trust does not.
        caveat = "; on disturbed runs, untrustworthy" if self.disturbed else ""
        if self.faster and self.slower:
            return (
                f"its speed is mixed (significantly faster in {self.faster} and slower in "
                f"{self.slower} of {n} tests{caveat})"
            )
        if self.faster:
            return f"it is significantly faster ({self.faster} of {n} tests{caveat})"
        if self.slower:
            return f"it is significantly slower ({self.slower} of {n} tests{caveat})"
        unknown = f", {self.unknown} of unknown noise" if self.unknown else ""
        return (
            "it is not significantly faster or slower "
            f"({self.within_noise} of {n} tests within noise{unknown}{caveat})"
        )


def speed_tally(pairs: Sequence[tuple[RunRecord, RunRecord]]) -> SpeedTally:
    """Count B's verdicts over the pairs of runs that both ran stably."""
    counts = {"faster": 0, "slower": 0, "within_noise": 0, "unknown": 0}
    disturbed = False
    for ra, rb in pairs:
        if not ra.status == rb.status == "stable":
            continue
        disturbed = disturbed or bool(ra.disturbed or rb.disturbed)
        tests_b = {t.name: t for t in rb.tests}
        for ta in ra.tests:
            tb = tests_b.get(ta.name)
            if tb is None:
                continue
            differ = differs(ta, tb)
            if differ is None:
                counts["unknown"] += 1
            elif not differ:
                counts["within_noise"] += 1
            else:
                counts["faster" if tb.mean > ta.mean else "slower"] += 1
    return SpeedTally(**counts, disturbed=disturbed)


def bench_quality(record: BenchRecord) -> QualityRecord | None:
    """The bench's quality: measured once and recorded in every run; the first measured one."""
    found = [run.quality for run in record.runs if run.quality is not None]
    measured = [q for q in found if q.status == "measured"]
    chosen = measured or found
    return chosen[0] if chosen else None


def quality_phrase(comparison: QualityComparison) -> str:
    a, b = comparison.a, comparison.b
    if comparison.figure is None or a is None or b is None:
        return f"its quality was not compared ({comparison.why_not})"
    figures = (
        f"mean KLD {kld_text(b)} vs {kld_text(a)}"
        if comparison.figure == "KLD"
        else f"PPL {ppl_text(b)} vs {ppl_text(a)}"
    )
    if comparison.better == "B":
        return f"its quality is significantly better ({figures})"
    if comparison.better == "A":
        return f"its quality is significantly worse ({figures})"
    return f"its quality is not significantly different ({figures})"


def goal_sentence(
    pairs: Sequence[tuple[RunRecord, RunRecord]], a: BenchRecord, b: BenchRecord, na: str, nb: str
) -> str:
    """`**B vs A:** <speed>, and <quality>.`"""
    tally = speed_tally(pairs)
    quality = compare_quality(bench_quality(a), bench_quality(b))
    return f"**{nb} vs {na}:** {tally.phrase()}, and {quality_phrase(quality)}."


def goal_data(
    pairs: Sequence[tuple[RunRecord, RunRecord]], a: BenchRecord, b: BenchRecord, na: str, nb: str
) -> dict[str, Any]:
    tally = speed_tally(pairs)
    quality = compare_quality(bench_quality(a), bench_quality(b))
    return {
        "sentence": goal_sentence(pairs, a, b, na, nb),
        "speed": {
            "faster": tally.faster,
            "slower": tally.slower,
            "within_noise": tally.within_noise,
            "unknown": tally.unknown,
            "disturbed": tally.disturbed,
        },
        "quality": quality_data(quality),
    }


def quality_data(comparison: QualityComparison) -> dict[str, Any]:
    def estimate(e: Estimate | None) -> dict[str, float] | None:
        return None if e is None else {"value": e.value, "error": e.error}

    return {
        "figure": comparison.figure,
        "a": estimate(comparison.a),
        "b": estimate(comparison.b),
        "difference": comparison.difference,
        "verdict": comparison.verdict,
        "better": comparison.better,
        "why_not": comparison.why_not or None,
    }
