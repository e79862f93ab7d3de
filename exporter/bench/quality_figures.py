"""Quality figures as the report, `bench compare` and the chart write them, and when two differ.

Every figure comes from a `QualityRecord` in the JSON, spelled with the digits llama-perplexity
prints (PPL 4 decimals, KLD 6, same-top 3, as percent), so a report rendered again reads the
same.

**When is a difference significant?** llama-perplexity gives each mean with its standard error
(the `±`), over thousands of scored tokens, so each mean is close to normally distributed.
Two variants differ beyond their noise when

    |b - a| > 1.96 × sqrt(e_a² + e_b²)

a two-sided z-test at 95 %, the large-sample form of the Welch test the speed comparison uses.
The two runs score the same tokens, so their errors are positively correlated and the true
error of the difference is smaller than this: the test errs towards "within noise", never
towards a difference that is not there. An error printed as 0 (below the printed digits) is
taken as half the last printed digit.

Lower is better for both figures. Mean KL divergence from one baseline is the measure of a
quant's quality; PPL is compared only when there is no common baseline, since it mixes the
model's own skill on the text into the quant's loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final, Literal

from exporter.bench.record import Estimate, QualityRecord

Z95: Final = 1.96
# Half the last digit of `Mean KLD: %10.6lf` and `Mean PPL(Q): %10.6lf`.
_RESOLUTION: Final = 0.5e-6

QualityVerdict = Literal["significant", "within noise"]
Figure = Literal["KLD", "PPL"]


def ppl_text(e: Estimate) -> str:
    return f"{e.value:.4f} ± {e.error:.4f}"


def kld_text(e: Estimate) -> str:
    return f"{e.value:.6f} ± {e.error:.6f}"


def percent_text(e: Estimate) -> str:
    return f"{e.value:.3f} ± {e.error:.3f} %"


def ratio_text(e: Estimate) -> str:
    return f"{e.value:.6f} ± {e.error:.6f}"


def short_cell(quality: QualityRecord | None) -> str:
    """One table cell: KLD and PPL where measured, the status otherwise."""
    if quality is None:
        return "—"
    if quality.status != "measured" or quality.ppl is None:
        return "interrupted" if quality.status == "interrupted" else "failed"
    ppl = f"PPL {ppl_text(quality.ppl)}"
    return f"KLD {kld_text(quality.kld)}, {ppl}" if quality.kld is not None else ppl


def differs(a: Estimate, b: Estimate) -> bool:
    """Whether b differs from a beyond their standard errors (z-test at 95 %)."""
    ea, eb = max(a.error, _RESOLUTION), max(b.error, _RESOLUTION)
    return abs(b.value - a.value) > Z95 * math.hypot(ea, eb)


@dataclass(frozen=True)
class QualityComparison:
    """B's quality against A's: on which figure, by how much, and whether it is noise."""

    figure: Figure | None  # None: not comparable
    a: Estimate | None = None
    b: Estimate | None = None
    why_not: str = ""  # when not comparable

    @property
    def difference(self) -> float | None:
        return None if self.a is None or self.b is None else self.b.value - self.a.value

    @property
    def verdict(self) -> QualityVerdict | None:
        if self.a is None or self.b is None:
            return None
        return "significant" if differs(self.a, self.b) else "within noise"

    @property
    def better(self) -> Literal["A", "B"] | None:
        """Which is better, when the difference is significant (lower is better)."""
        if self.verdict != "significant" or self.difference is None:
            return None
        return "B" if self.difference < 0 else "A"

    def change_text(self) -> str:
        """B's difference, in the unit people read it in: KLD absolute, PPL relative."""
        difference = self.difference
        if difference is None or self.a is None:
            return self.why_not or "not comparable"
        if self.figure == "KLD":
            change = f"KLD {difference:+.6f}"
        else:
            change = f"PPL {difference / self.a.value * 100:+.1f} %" if self.a.value else "PPL"
        return f"{change} ({self.verdict})"


def _measured(quality: QualityRecord | None) -> bool:
    return quality is not None and quality.status == "measured" and quality.ppl is not None


def _same_baseline(a: QualityRecord, b: QualityRecord) -> bool:
    return (
        a.baseline_model == b.baseline_model
        and a.baseline_model_bytes == b.baseline_model_bytes
        and a.text_sha256 == b.text_sha256
        and a.ctx == b.ctx
        and a.chunks == b.chunks
    )


def _why_not(a: QualityRecord | None, b: QualityRecord | None) -> str | None:
    missing = [side for side, q in (("A", a), ("B", b)) if not _measured(q)]
    return f"not measured in {' and '.join(missing)}" if missing else None


def compare_kld(a: QualityRecord | None, b: QualityRecord | None) -> QualityComparison:
    """Mean KLD, when both were measured against one baseline over the same tokens."""
    why = _why_not(a, b)
    if why is not None or a is None or b is None:
        return QualityComparison(None, why_not=why or "not measured")
    if a.kld is None or b.kld is None:
        return QualityComparison(None, why_not="no KL divergence in both")
    if not _same_baseline(a, b):
        return QualityComparison(None, why_not="not comparable: different baselines")
    return QualityComparison("KLD", a.kld, b.kld)


def compare_ppl(a: QualityRecord | None, b: QualityRecord | None) -> QualityComparison:
    """PPL, when both were measured over the same tokens of the same text."""
    why = _why_not(a, b)
    if why is not None or a is None or b is None or a.ppl is None or b.ppl is None:
        return QualityComparison(None, why_not=why or "not measured")
    if a.text_sha256 != b.text_sha256:
        return QualityComparison(None, why_not="not comparable: different texts")
    if (a.ctx, a.chunks) != (b.ctx, b.chunks):
        return QualityComparison(
            None,
            why_not=f"not comparable: {a.chunks} chunks of {a.ctx} vs {b.chunks} of {b.ctx}",
        )
    return QualityComparison("PPL", a.ppl, b.ppl)


def compare_quality(a: QualityRecord | None, b: QualityRecord | None) -> QualityComparison:
    """The comparison that judges quality: KLD from one baseline, else PPL."""
    kld = compare_kld(a, b)
    return kld if kld.figure is not None else compare_ppl(a, b)


def change_cell(a: QualityRecord | None, b: QualityRecord | None) -> str:
    """B vs A in a table cell: KLD's and PPL's differences where each is comparable."""
    compared = [c for c in (compare_kld(a, b), compare_ppl(a, b)) if c.figure is not None]
    if not compared:
        return compare_quality(a, b).change_text()
    return "; ".join(c.change_text() for c in compared)
