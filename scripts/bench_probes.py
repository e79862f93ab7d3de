"""How repeatable are the probes, next to llama-bench on the same model and depth?

Starts a real llama-server on a generated model, runs probe rounds with several plans, runs
llama-bench with the same sizes, and prints a Markdown report (docs/benchmarks.md holds one).
It also measures what the exporter itself costs: scrape latency and resident memory.

    .venv/bin/python scripts/bench_probes.py --rounds 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, TypedDict

import httpx

from exporter.config import Config, Target
from exporter.daemon import Daemon
from exporter.llama.client import LlamaClient
from exporter.llama.server_process import default_binary, free_port
from exporter.probe.plan import MeasurePlan
from exporter.probe.runner import ProbeRunner
from exporter.schedule.plan import Schedule
from testbed.llama_server import LlamaServerProcess
from testbed.tiny_model import write_tiny_model


# The reference model of the noise measurements: 6 layers, 384 wide, about 31 MB of F32.
class Geometry(TypedDict):
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int


GEOMETRY = Geometry(n_layer=6, n_embd=384, n_head=6, n_head_kv=2, n_ff=1024)


def cv(values: list[float]) -> float:
    return statistics.stdev(values) / statistics.mean(values) if len(values) > 1 else 0.0


async def probe_rounds(
    url: str, plan: MeasurePlan, rounds: int
) -> dict[str, tuple[list[float], list[float], list[float]]]:
    """Per test: each round's figure (token-weighted over its repetitions, as exported) and
    each single request's speed."""
    client = LlamaClient(url, timeout=plan.timeout)
    runner = ProbeRunner("bench", client, plan)
    figures: dict[str, tuple[list[float], list[float], list[float]]] = {}
    try:
        for _ in range(rounds):
            result = await runner.run_round()
            for depth in plan.depths:
                for kind, key in (("prompt", "pp"), ("generation", "tg")):
                    samples = [s for s in result.samples if s.kind == kind and s.depth == depth]
                    if samples:
                        per_round, singles, medians = figures.setdefault(
                            f"{key}@d{depth}", ([], [], [])
                        )
                        per_round.append(
                            sum(s.tokens for s in samples) / sum(s.seconds for s in samples)
                        )
                        singles.extend(s.tokens_per_second for s in samples)
                        medians.append(statistics.median(s.tokens_per_second for s in samples))
    finally:
        await client.aclose()
    return figures


def llama_bench(model: Path, n_prompt: int, n_gen: int, depths: str, reps: int) -> list[Any]:
    binary = default_binary().parent / "llama-bench"
    out = subprocess.run(
        [str(binary), "-m", str(model), "-p", str(n_prompt), "-n", str(n_gen), "-d", depths,
         "-r", str(reps), "-t", "2", "-o", "json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return list(json.loads(out.stdout))


def exporter_overhead(url: str, scrapes: int) -> tuple[float, float, float]:
    """Median and p99 /metrics latency (ms) and the exporter's RSS (MiB) after the scrapes."""
    plan = MeasurePlan(timeout=4.0, prompt_tokens=128, generation_tokens=16)
    schedule = Schedule(interval=5.0, jitter=0.0, discovery_interval=1.0, duty_budget=1.0)
    port = free_port()
    target = Target("bench", url, plan=plan, schedule=schedule)
    config = Config((target,), f"127.0.0.1:{port}", "/metrics", "json", "error")
    daemon = Daemon(config, first_probe_delay=0.1)

    async def scrape() -> tuple[list[float], float]:
        task = asyncio.create_task(daemon.run(handle_signals=False))
        latencies: list[float] = []
        rss = 0.0
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            while "llama_speed_probe_success{" not in (await http.get("/metrics")).text:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
            for _ in range(scrapes):
                started = time.perf_counter()
                text = (await http.get("/metrics")).text
                latencies.append((time.perf_counter() - started) * 1000)
            for line in text.splitlines():
                if line.startswith("process_resident_memory_bytes "):
                    rss = float(line.split()[1]) / 2**20
        daemon.request_stop()
        await task
        return latencies, rss

    latencies, rss = asyncio.run(scrape())
    latencies.sort()
    return statistics.median(latencies), latencies[int(len(latencies) * 0.99) - 1], rss


def bench_rows(model: Path, depth: int, runs: int, reps: int) -> list[str]:
    """llama-bench's figure is the mean of its repetitions: its repeatability is the spread of
    that mean over whole runs, which is what a probe round's figure is compared with."""
    means: dict[str, list[float]] = {}
    per_rep_cv: dict[str, list[float]] = {}
    for _ in range(runs):
        for entry in llama_bench(model, 512, 128, f"0,{depth}", reps):
            kind = "pp" if entry["n_prompt"] else "tg"
            test = f"{kind}@d{entry['n_depth']}"
            means.setdefault(test, []).append(entry["avg_ts"])
            per_rep_cv.setdefault(test, []).append(entry["stddev_ts"] / entry["avg_ts"])
    return [
        f"| llama-bench -r {reps}, {runs} runs | {test} | {statistics.mean(values):,.0f} "
        f"| {cv(values):.1%} | | {statistics.mean(per_rep_cv[test]):.1%} |"
        for test, values in means.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--depth", type=int, default=2048)
    parser.add_argument("--bench-runs", type=int, default=10)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="bench-probes-"))
    model = write_tiny_model(workdir / "bench.gguf", **GEOMETRY)
    plans: dict[str, dict[str, Any]] = {
        "r1, no warm-up": {"repetitions": 1, "warmup": False},
        "r1, warm-up": {"repetitions": 1, "warmup": True},
        "r3, warm-up (default)": {"repetitions": 3, "warmup": True},
        "r5, warm-up": {"repetitions": 5, "warmup": True},
        "r3, warm-up, tg256": {"repetitions": 3, "warmup": True, "generation_tokens": 256},
    }
    rows: list[str] = []
    server = LlamaServerProcess(model, ["-c", "8192", "-np", "1"], log_path=workdir / "srv.log")
    with server:
        for name, change in plans.items():
            plan = MeasurePlan(depths=(0, args.depth), **change)
            figures = asyncio.run(probe_rounds(server.url, plan, args.rounds))
            for test, (round_figures, samples, medians) in figures.items():
                rows.append(
                    f"| exporter {name}, {len(round_figures)} rounds | {test} "
                    f"| {statistics.mean(round_figures):,.0f} | {cv(round_figures):.1%} "
                    f"| {cv(medians):.1%} | {cv(samples):.1%} |"
                )
        overhead = exporter_overhead(server.url, 200)
    rows += bench_rows(model, args.depth, args.bench_runs, 3)
    print(f"Model: generated, {GEOMETRY}, F32; llama-server -c 8192 -np 1 -t 2; "
          f"{platform.machine()}, Python {platform.python_version()}\n")  # fmt: skip
    print(
        "| source | test | mean t/s | CV of the figure (mean of reps) "
        "| CV if the figure were the median of reps | CV of one request or rep |"
    )
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(
        f"\nExporter overhead: /metrics median {overhead[0]:.2f} ms, p99 {overhead[1]:.2f} ms "
        f"over 200 scrapes; resident memory {overhead[2]:.0f} MiB."
    )


if __name__ == "__main__":
    main()
