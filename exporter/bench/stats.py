"""Per-test figures as llama-bench reports them, and whether two of them really differ.

llama-bench prints, per test, the mean of the repetitions' tokens per second and their sample
standard deviation. A comparison between two runs asks whether the difference of the means is
larger than the repetitions' noise explains: Welch's t-test at 95 %, which does not assume the
two runs are equally noisy.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from typing import TYPE_CHECKING, Final, Literal

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from exporter.bench.record import SampleRecord

Kind = Literal["prompt", "generation"]

# Two-sided 95 % quantiles of Student's t for 1..30 degrees of freedom; past 30, the normal's.
_T95: Final = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip
_Z95: Final = 1.960


class TestStats(BaseModel):
    """One llama-bench test (pp512, tg128 @ d4096, ...) over its repetitions."""

    model_config = ConfigDict(frozen=True, extra="ignore")
    __test__ = False  # not a pytest test class, despite the name

    name: str
    kind: Kind
    depth: int
    tokens: int
    n: int
    mean: float  # tokens per second
    sd: float | None  # sample standard deviation; None for a single repetition
    ttft_mean_seconds: float | None = None


def test_name(kind: Kind, tokens: int, depth: int) -> str:
    # A TG sample times the steps after the first token, which arrives with the prompt: a
    # request for 128 tokens times 127 steps, and is llama-bench's tg128.
    name = f"pp{tokens}" if kind == "prompt" else f"tg{tokens + 1}"
    return f"{name} @ d{depth}" if depth else name


def summarize(samples: Iterable[SampleRecord]) -> tuple[TestStats, ...]:
    groups: dict[tuple[int, bool, int], list[SampleRecord]] = {}
    for s in samples:
        groups.setdefault((s.depth, s.kind != "prompt", s.tokens), []).append(s)
    out = []
    for (depth, _, tokens), group in sorted(groups.items()):
        kind = group[0].kind
        speeds = [s.tokens_per_second for s in group]
        ttfts = [
            s.time_to_first_token_seconds
            for s in group
            if s.time_to_first_token_seconds is not None
        ]
        out.append(
            TestStats(
                name=test_name(kind, tokens, depth),
                kind=kind,
                depth=depth,
                tokens=tokens,
                n=len(speeds),
                mean=statistics.fmean(speeds),
                sd=statistics.stdev(speeds) if len(speeds) > 1 else None,
                ttft_mean_seconds=statistics.fmean(ttfts) if ttfts else None,
            )
        )
    return tuple(out)


def t_critical_95(df: float) -> float:
    if df >= len(_T95) + 1:
        return _Z95
    # Rounding the Welch-Satterthwaite df down keeps the test conservative.
    return _T95[max(1, math.floor(df)) - 1]


def differs(a: TestStats, b: TestStats) -> bool | None:
    """Whether b's mean differs from a's beyond the noise; None when a spread is unknown."""
    if a.sd is None or b.sd is None:
        return None
    va, vb = a.sd**2 / a.n, b.sd**2 / b.n
    se = math.sqrt(va + vb)
    diff = abs(b.mean - a.mean)
    if se == 0:
        return diff > 0
    df = (va + vb) ** 2 / ((va**2 / (a.n - 1)) + (vb**2 / (b.n - 1))) if va or vb else math.inf
    return diff / se > t_critical_95(df)
