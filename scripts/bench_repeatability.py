"""How repeatable is a `bench` figure, next to llama-bench's, on the same model and machine?

Runs `llama-speed-exporter bench` (launching mode: a fresh llama-server per run) and llama-bench
alternately, `--runs` times each, with the same sizes, depths and repetitions, and prints a
Markdown table: per test, the mean of the runs' figures (each the mean over its repetitions, as
both tools report it), the coefficient of variation of that figure across runs, and the mean
within-run CV of single repetitions. Alternating puts the machine's drift on both alike.

    .venv/bin/python scripts/bench_repeatability.py --runs 8
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_probes import GEOMETRY, cv, llama_bench

from exporter.bench.record import load
from exporter.llama.server_process import default_binary
from testbed.tiny_model import write_tiny_model


def bench_once(model: Path, out: Path, depths: str, reps: int) -> dict[str, tuple[float, float]]:
    """Per test: the run's mean t/s and the CV of its repetitions."""
    cmd = f"{default_binary()} -m {model} -t 2"
    subprocess.run(
        [sys.executable, "-m", "exporter", "bench", "--server-cmd", cmd, "--ctx", "8192",
         "-d", depths, "-r", str(reps), "--no-chart", "--no-gpu", "-o", str(out)],
        capture_output=True, check=True,
    )  # fmt: skip
    (run,) = load(out / "results.json").runs
    return {
        f"{t.name.split(' ')[0][:2]}@d{t.depth}": (t.mean, (t.sd or 0.0) / t.mean)
        for t in run.tests
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--depth", type=int, default=2048)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-repeatability-"))
    model = write_tiny_model(workdir / "bench.gguf", **GEOMETRY)
    depths = f"0,{args.depth}"
    figures: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for i in range(args.runs):
        for test, figure in bench_once(model, workdir / f"run-{i}", depths, args.reps).items():
            figures.setdefault(("bench", test), []).append(figure)
        for entry in llama_bench(model, 512, 128, depths, args.reps):
            test = f"{'pp' if entry['n_prompt'] else 'tg'}@d{entry['n_depth']}"
            figure = (entry["avg_ts"], entry["stddev_ts"] / entry["avg_ts"])
            figures.setdefault(("llama-bench", test), []).append(figure)
    print(
        f"Model: generated, {GEOMETRY}, F32; pp512 and tg128 at depths {depths}, "
        f"-r {args.reps}, {args.runs} runs each, alternating; bench launches llama-server "
        f"-c 8192 -t 2 per run, llama-bench -t 2; {platform.machine()}, "
        f"Python {platform.python_version()}\n"
    )
    print("| source | test | mean t/s | CV of the run's figure | mean CV of repetitions |")
    print("|---|---|---|---|---|")
    for (source, test), values in sorted(figures.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        means = [m for m, _ in values]
        print(
            f"| {source} | {test} | {statistics.mean(means):,.0f} | {cv(means):.1%} "
            f"| {statistics.mean(c for _, c in values):.1%} |"
        )


if __name__ == "__main__":
    main()
