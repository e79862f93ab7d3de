"""What the `probe` command prints of its rounds: llama-bench's table, or JSON."""

from __future__ import annotations

from typing import Any

from exporter.probe.results import RoundResult
from exporter.probe.stats import summarize


def round_succeeded(result: RoundResult) -> bool:
    return bool(result.outcomes) and all(o.succeeded for o in result.outcomes.values())


def result_json(result: RoundResult) -> dict[str, Any]:
    server = result.server
    return {
        "target": result.target,
        "ok": round_succeeded(result),
        "model": server.model if server else None,
        "ctx": server.ctx if server else None,
        "quant": server.quant if server else None,
        "build": server.build if server else None,
        "duration_seconds": result.duration,
        "skipped": list(result.skips),
        "failures": {k: o.failure for k, o in result.outcomes.items() if o.failure},
        "discarded": {k: list(o.discards) for k, o in result.outcomes.items() if o.discards},
        "detail": result.detail,
        "samples": [
            {
                "kind": s.kind,
                "depth": s.depth,
                "tokens": s.tokens,
                "seconds": s.seconds,
                "tokens_per_second": s.tokens_per_second,
                "time_to_first_token_seconds": s.time_to_first_token_seconds,
                "timings": vars(s.timings),
            }
            for s in result.samples
        ],
    }


def table(results: list[RoundResult]) -> str:
    """llama-bench's layout: one row per test, mean and sample standard deviation over reps."""
    lines = []
    for r in results:
        server = r.server
        head = f"{r.target}: " + (
            f"{server.model} ({server.quant}), ctx {server.ctx}, build {server.build}"
            if server
            else "server unavailable"
        )
        lines += [head, f"{'test':<18}{'t/s':>22}{'TTFT ms':>10}"]
        for test in summarize(r.samples):
            figure = f"{test.mean:.2f} ± {test.sd or 0.0:.2f}"
            ttft = test.ttft_mean_seconds
            ttft_ms = "" if ttft is None else f"{ttft * 1e3:.1f}"
            lines.append(f"{test.name:<18}{figure:>22}{ttft_ms:>10}")
        status = "ok" if round_succeeded(r) else "FAILED"
        problems = [*r.skips, *(f"{k}: {o.failure}" for k, o in r.outcomes.items() if o.failure)]
        problems += [f"{k}: discarded ({', '.join(o.discards)})" for k, o in r.outcomes.items()
                     if o.discards]  # fmt: skip
        if problems:
            status += " (" + ", ".join(problems) + (f"; {r.detail}" if r.detail else "") + ")"
        lines += [f"status: {status}", ""]
    return "\n".join(lines).rstrip()
