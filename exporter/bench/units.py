"""How bench reports write sizes, contexts and speeds: one spelling for every renderer."""

from __future__ import annotations

from typing import Final

from exporter.probe.stats import TestStats

_KIB: Final = 1024
MIB: Final = _KIB**2
GIB: Final = _KIB**3


def ctx_label(tokens: int | None) -> str:
    """32768 -> "32k", as -c values are usually named; other values in full ("1,000")."""
    if tokens is None:
        return "unknown"
    if tokens and tokens % _KIB == 0:
        return f"{tokens // _KIB}k"
    return f"{tokens:,}"


def size(n_bytes: int | None) -> str:
    """Binary units with two significant decimals: 9.40 GiB, 320.0 MiB, 10.0 KiB."""
    if n_bytes is None:
        return "n/a"
    for unit, scale, digits in (("GiB", _KIB**3, 2), ("MiB", _KIB**2, 1), ("KiB", _KIB, 1)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.{digits}f} {unit}"
    return f"{n_bytes} B"


def gib(n_bytes: int | None) -> str:
    return "n/a" if n_bytes is None else f"{n_bytes / GIB:.2f}"


def speed(stats: TestStats) -> str:
    """llama-bench's `mean ± sd`; a single repetition has no spread to show."""
    if stats.sd is None:
        return f"{stats.mean:.2f} (n=1)"
    return f"{stats.mean:.2f} ± {stats.sd:.2f}"
