"""What llama-perplexity printed, read into figures: PPL, or KL divergence from a baseline.

llama.cpp b11434's `tools/perplexity/perplexity.cpp` prints its result in one of two shapes:

- perplexity of a text: per-chunk estimates `[1]349.4843,[2]375.8362,...`, then
  `Final estimate: PPL = 372.9810 +/- 5.81601` (a log line, so after a timestamp and level);
- KL divergence (`--kl-divergence`): a table per chunk, then `====== Perplexity statistics`
  (`Mean PPL(Q)`, `Mean PPL(base)`, `Mean ln(PPL(Q)/PPL(base))`, `Mean PPL(Q)/PPL(base)`, each
  `x ± e`), `====== KL divergence statistics` (`Mean    KLD:   x ± e`, then percentiles:
  `Maximum KLD`, `99.9%   KLD`, ..., `Median  KLD`, ...) and `Same top p: x ± e %`. It prints
  the statistics only over 100 tokens or more.

Each figure is found by its own label anywhere in the output, so that stdout and stderr may
come in any order, and a line prefix (timestamp, level, colour) does not matter. The tool exits
0 even when it printed an error and no result (a text too short for its context, a baseline
file it cannot read), so a missing figure, not the exit status, says that it failed.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Final

from exporter.bench.record import Estimate

_NUMBER: Final = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+|nan|inf)(?:[eE][-+]?\d+)?"
_PLUS_MINUS: Final = r"\s*(?:±|\+/-)\s*"
_ANSI: Final = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# llama.cpp's log prefix: `0.00.052.989 I ` (time since start, then the level's letter).
_LOG_PREFIX: Final = re.compile(r"^\d+\.\d+\.\d+\.\d+ ([IWEDT]) ", re.MULTILINE)
_ERROR_LINE: Final = re.compile(r"^\d+\.\d+\.\d+\.\d+ E (.*)$", re.MULTILINE)
_ERROR_WORDS: Final = re.compile(
    r"error|failed|out of memory|unable|cannot|you need at least|tokenizes to only|abort",
    re.IGNORECASE,
)


def _estimate_pattern(label: str) -> re.Pattern[str]:
    return re.compile(rf"{label}\s*[:=]\s*({_NUMBER}){_PLUS_MINUS}({_NUMBER})")


def _value_pattern(label: str) -> re.Pattern[str]:
    return re.compile(rf"{label}\s*:\s*({_NUMBER})")


_FINAL_PPL: Final = _estimate_pattern(r"Final estimate: PPL")
_PPL_Q: Final = _estimate_pattern(r"Mean PPL\(Q\)")
_PPL_BASE: Final = _estimate_pattern(r"Mean PPL\(base\)")
_LN_RATIO: Final = _estimate_pattern(r"Mean ln\(PPL\(Q\)/PPL\(base\)\)")
_RATIO: Final = _estimate_pattern(r"Mean PPL\(Q\)/PPL\(base\)")
_KLD: Final = _estimate_pattern(r"Mean\s+KLD")
_KLD_MAX: Final = _value_pattern(r"Maximum KLD")
_KLD_P99: Final = _value_pattern(r"99\.0%\s+KLD")
_KLD_MEDIAN: Final = _value_pattern(r"Median\s+KLD")
_SAME_TOP: Final = re.compile(rf"Same top p\s*:\s*({_NUMBER}){_PLUS_MINUS}({_NUMBER})\s*%")
_CHUNKS: Final = re.compile(r"(?:calculating perplexity|computing) over (\d+) chunks, n_ctx=(\d+)")
# llama-perplexity computes its KL statistics only from this many scored tokens on.
MIN_KLD_TOKENS: Final = 100


class PerplexityOutputError(ValueError):
    """The output holds no result: why, in one line, for the report."""


class MissingFigureError(PerplexityOutputError):
    """A figure is not in the output at all: the run failed before it, or its output was cut."""


class TooFewTokensError(PerplexityOutputError):
    """A KL divergence run that measured, over too few tokens for statistics: running it
    again would print the same."""


@dataclass(frozen=True)
class PerplexityResult:
    ppl: Estimate
    chunks: int | None = None  # chunks evaluated
    n_ctx: int | None = None
    # KL divergence mode only.
    ppl_base: Estimate | None = None
    ln_ppl_ratio: Estimate | None = None
    ppl_ratio: Estimate | None = None
    kld: Estimate | None = None
    kld_median: float | None = None
    kld_p99: float | None = None
    kld_max: float | None = None
    same_top_percent: Estimate | None = None


def clean(text: str) -> str:
    """The output without colour codes and with `\\r` line ends made plain."""
    return _ANSI.sub("", text).replace("\r\n", "\n")


def error_lines(text: str) -> list[str]:
    """The lines llama.cpp logged at error level, without their prefix."""
    return [m.group(1).strip() for m in _ERROR_LINE.finditer(clean(text)) if m.group(1).strip()]


def failure_reason(text: str, returncode: int | None) -> str:
    """Why a run printed no result, from its own words where it said any."""
    said = error_lines(text)
    if not said:
        # Some messages are printed without a level prefix (GGML_ASSERT, CUDA errors).
        plain = [_LOG_PREFIX.sub("", line).strip() for line in clean(text).splitlines()]
        said = [line for line in plain if _ERROR_WORDS.search(line)]
    status = "" if returncode in (None, 0) else f" (exit status {returncode})"
    if said:
        # The first says what went wrong (out of memory, no such file); those after it are
        # its consequences, down to the tool's last word.
        unique = _unique(said)
        shown = unique if len(unique) <= 2 else [unique[0], "…", unique[-1]]
        return "; ".join(shown) + status
    if returncode not in (None, 0):
        return f"llama-perplexity exited with status {returncode} and no error message"
    return "llama-perplexity printed no result and no error message"


def _unique(lines: list[str]) -> list[str]:
    return list(dict.fromkeys(lines))


def parse_perplexity(text: str) -> PerplexityResult:
    """The figures of a perplexity run (`Final estimate`); raises PerplexityOutputError."""
    out = clean(text)
    ppl = _estimate(_FINAL_PPL, out, "final PPL estimate")
    chunks, n_ctx = _chunks(out)
    return PerplexityResult(ppl=ppl, chunks=chunks, n_ctx=n_ctx)


def parse_kl_divergence(text: str) -> PerplexityResult:
    """The figures of a KL divergence run; raises PerplexityOutputError."""
    out = clean(text)
    chunks, n_ctx = _chunks(out)
    if _KLD.search(out) is None and chunks is not None and n_ctx is not None:
        scored = chunks * (n_ctx - 1 - n_ctx // 2)
        if scored < MIN_KLD_TOKENS:
            # It measured, but computes the statistics only from MIN_KLD_TOKENS tokens on.
            raise TooFewTokensError(
                f"llama-perplexity scored {scored} tokens ({chunks} chunks of {n_ctx}) and "
                f"prints KL divergence statistics from {MIN_KLD_TOKENS} on; give more chunks "
                "or a longer context"
            )
    return PerplexityResult(
        ppl=_estimate(_PPL_Q, out, "Mean PPL(Q)"),
        chunks=chunks,
        n_ctx=n_ctx,
        ppl_base=_estimate(_PPL_BASE, out, "Mean PPL(base)"),
        ln_ppl_ratio=_estimate(_LN_RATIO, out, "Mean ln(PPL(Q)/PPL(base))"),
        ppl_ratio=_estimate(_RATIO, out, "Mean PPL(Q)/PPL(base)"),
        kld=_estimate(_KLD, out, "Mean KLD"),
        kld_median=_value(_KLD_MEDIAN, out, "Median KLD"),
        kld_p99=_value(_KLD_P99, out, "99.0% KLD"),
        kld_max=_value(_KLD_MAX, out, "Maximum KLD"),
        same_top_percent=_estimate(_SAME_TOP, out, "Same top p"),
    )


def _chunks(out: str) -> tuple[int | None, int | None]:
    found = _CHUNKS.search(out)
    return (int(found.group(1)), int(found.group(2))) if found else (None, None)


def _finite(text: str, what: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise PerplexityOutputError(f"llama-perplexity printed {what} as {text}")
    return value


def _estimate(pattern: re.Pattern[str], out: str, what: str) -> Estimate:
    # The last one: the summary follows any per-chunk line that could match.
    found = list(pattern.finditer(out))
    if not found:
        raise MissingFigureError(f"llama-perplexity printed no {what}")
    value, error = found[-1].groups()
    return Estimate(value=_finite(value, what), error=_finite(error, f"the ± of {what}"))


def _value(pattern: re.Pattern[str], out: str, what: str) -> float:
    found = list(pattern.finditer(out))
    if not found:
        raise MissingFigureError(f"llama-perplexity printed no {what}")
    return _finite(found[-1].group(1), what)
