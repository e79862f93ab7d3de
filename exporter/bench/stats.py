"""Whether two llama-bench-style figures really differ.

A comparison between two runs asks whether the difference of the means is larger than the
repetitions' noise explains: Welch's t-test at 95 %, which does not assume the two runs are
equally noisy.
"""

from __future__ import annotations

import math
from typing import Final

from exporter.probe.stats import TestStats

# Two-sided 95 % quantiles of Student's t for 1..30 degrees of freedom; past 30, the normal's.
_T95: Final = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip
_Z95: Final = 1.960


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
