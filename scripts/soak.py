"""Soak: the daemon's resident memory over many probe rounds against a real llama-server.

Starts the testbed's llama-server on a generated tiny model, runs the exporter daemon against
it as a user does (`llama-speed-exporter run` in a subprocess, settings through the
environment), with a small, fast plan, and reads the daemon's VmRSS from /proc/<pid>/status
every `--sample-every` rounds until `--rounds` rounds are recorded. It prints a table and
writes JSON: the RSS at rounds 10, 100, 500 and 1,000 (the first sample at or after each),
and the spread (max - min) of every sample after `--warmup` rounds. The bar: that spread stays
within `--bar-mib` (5 MiB); the exit status is 0 when it does, 1 when not, 2 when the run
broke (the daemon exited, or rounds stopped coming).

    .venv/bin/python scripts/soak.py --json /tmp/soak.json

1,000 rounds at the default 0.5 s interval take about 9 minutes, plus a few seconds to write
the model and start the server (docs/benchmarks.md, "Soak: memory over 1,000 rounds").

It reuses scripts/daemon_memory.py's reading of rounds and of /proc/<pid>/status; that script
compares versions after a few rounds, this one follows one version over many.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
from daemon_memory import FAST_ROUNDS, rounds_done, status_kib

from exporter.llama.server_process import free_port
from testbed.llama_server import LlamaServerProcess
from testbed.tiny_model import write_tiny_model

CHECKPOINTS = (10, 100, 500, 1000)
# How often /metrics is read to count rounds: often enough to sample near each multiple of
# --sample-every at a 0.3 s interval, and light next to the probes themselves.
POLL_INTERVAL_S = 0.1
# A round that does not come within this long (beyond its interval) means the run is stuck.
ROUND_STALL_S = 30.0


@dataclass(frozen=True)
class Sample:
    round: int
    elapsed_s: float
    rss_mib: float
    hwm_mib: float


def plan_env(interval: float) -> dict[str, str]:
    """daemon_memory's fast plan, made smaller and faster: one PP and one TG sample a round."""
    # The round's timeout must stay below the interval (the config refuses it otherwise); a
    # round of 32 + 8 tokens on the tiny model takes a few tens of milliseconds.
    return FAST_ROUNDS | {
        "LLAMA_SPEED_PROBE_INTERVAL": f"{interval:g}",
        "LLAMA_SPEED_PROBE_TIMEOUT": f"{interval * 0.8:g}",
        "LLAMA_SPEED_PROBE_JITTER": "0",
        "LLAMA_SPEED_PROBE_DISCOVERY_INTERVAL": f"{interval:g}",
        "LLAMA_SPEED_PROBE_PROMPT_TOKENS": "32",
        "LLAMA_SPEED_PROBE_GENERATION_TOKENS": "8",
        "LLAMA_SPEED_PROBE_REPETITIONS": "1",
        "LLAMA_SPEED_PROBE_DUTY_BUDGET": "1",
    }


def by_reason(text: str, name: str) -> dict[str, int]:
    """A counter's samples summed by their `reason` label (the other labels summed over);
    the reasons that never happened are left out."""
    totals: dict[str, int] = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, _, value = line.rpartition(" ")
            match = re.search(r'reason="([^"]*)"', labels)
            reason = match[1] if match else ""
            totals[reason] = totals.get(reason, 0) + int(float(value))
    return {reason: n for reason, n in totals.items() if n}


def exporter_command(python: str) -> list[str]:
    """The console script beside the interpreter, as a user runs it; else `python -m`."""
    script = Path(python).with_name("llama-speed-exporter")
    if script.is_file():
        return [str(script), "run"]
    return [python, "-m", "exporter", "run"]


def soak(
    python: str, url: str, *, rounds: int, every: int, interval: float, log: Path
) -> tuple[list[Sample], dict[str, dict[str, int]]]:
    """Run the daemon until `rounds` rounds are recorded; its RSS every `every` rounds."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_SPEED_")}
    env |= plan_env(interval) | {
        "LLAMA_SPEED_TARGET": url,
        "LLAMA_SPEED_WEB_LISTEN_ADDRESS": f"127.0.0.1:{port}",
    }
    samples: list[Sample] = []
    with log.open("wb") as log_file:
        proc = subprocess.Popen(exporter_command(python), env=env, stderr=log_file)
        try:
            started = time.monotonic()
            last_progress, seen, next_sample = started, 0, every
            text = ""
            while seen < rounds:
                try:
                    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
                except httpx.TransportError:
                    text = ""
                done = rounds_done(text)
                now = time.monotonic()
                if done > seen:
                    seen, last_progress = done, now
                if seen >= next_sample:
                    rss, hwm = status_kib(proc.pid, "VmRSS"), status_kib(proc.pid, "VmHWM")
                    samples.append(Sample(seen, round(now - started, 1), rss / 1024, hwm / 1024))
                    print(f"round {seen}: RSS {rss / 1024:.1f} MiB", file=sys.stderr, flush=True)
                    next_sample = (seen // every + 1) * every
                if proc.poll() is not None:
                    raise RuntimeError(f"the daemon exited ({proc.returncode}); log: {log}")
                if now - last_progress > interval + ROUND_STALL_S:
                    raise RuntimeError(f"no round for {ROUND_STALL_S:g} s after {seen}; log: {log}")
                time.sleep(POLL_INTERVAL_S)  # poll interval, bounded by the stall check above
            # The rounds that went wrong, by reason: a soak runs the error paths too.
            counts = {
                "probe_failures": by_reason(text, "llama_speed_probe_failures_total"),
                "probes_discarded": by_reason(text, "llama_speed_probes_discarded_total"),
                "rounds_skipped": by_reason(text, "llama_speed_probes_skipped_total"),
            }
            return samples, counts
        finally:
            proc.terminate()
            proc.wait(timeout=10)


def summary(samples: list[Sample], warmup: int, bar_mib: float) -> dict[str, Any]:
    checkpoints = {}
    for mark in CHECKPOINTS:
        first = next((s for s in samples if s.round >= mark), None)
        if first is not None:
            checkpoints[str(mark)] = asdict(first)
    settled = [s.rss_mib for s in samples if s.round >= warmup]
    spread = max(settled) - min(settled) if settled else None
    return {
        "checkpoints": checkpoints,
        "after_warmup": {
            "from_round": warmup,
            "samples": len(settled),
            "min_mib": min(settled, default=None),
            "max_mib": max(settled, default=None),
            "spread_mib": spread,
        },
        "bar_mib": bar_mib,
        "within_bar": spread is not None and spread <= bar_mib,
    }


def table(result: dict[str, Any]) -> str:
    rows = ["| round | elapsed, s | RSS, MiB | peak RSS, MiB |", "|---|---|---|---|"]
    for mark, s in result["checkpoints"].items():
        rows.append(
            f"| {mark} (sampled at {s['round']}) | {s['elapsed_s']:.0f} | {s['rss_mib']:.1f} "
            f"| {s['hwm_mib']:.1f} |"
        )
    after = result["after_warmup"]
    if after["spread_mib"] is not None:
        rows.append(
            f"\nAfter round {after['from_round']} ({after['samples']} samples): "
            f"min {after['min_mib']:.1f} MiB, max {after['max_mib']:.1f} MiB, "
            f"spread {after['spread_mib']:.2f} MiB "
            f"({'within' if result['within_bar'] else 'OVER'} the {result['bar_mib']:g} MiB bar)"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=sys.executable, help="the exporter's interpreter")
    parser.add_argument("--rounds", type=int, default=1000)
    parser.add_argument("--sample-every", type=int, default=10, metavar="ROUNDS")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between rounds")
    parser.add_argument("--warmup", type=int, default=100, metavar="ROUNDS",
                        help="rounds before the spread is measured")  # fmt: skip
    parser.add_argument("--bar-mib", type=float, default=5.0)
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the result here too")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.sample_every < 1 or args.interval <= 0:
        parser.error("--rounds, --sample-every and --interval must be positive")

    work = Path(tempfile.mkdtemp(prefix="soak-"))
    model = write_tiny_model(work / "tiny.gguf")
    started = time.monotonic()
    try:
        with LlamaServerProcess(model, ["-c", "4096"], log_path=work / "llama-server.log") as srv:
            samples, counts = soak(
                args.python, srv.url, rounds=args.rounds, every=args.sample_every,
                interval=args.interval, log=work / "exporter.log",
            )  # fmt: skip
    except RuntimeError as exc:
        print(f"soak: {exc}", file=sys.stderr)
        return 2
    result: dict[str, Any] = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "rounds": args.rounds,
        "interval_s": args.interval,
        "duration_s": round(time.monotonic() - started, 1),
        "plan": plan_env(args.interval),
        "work_dir": str(work),  # the model, and llama-server's and the daemon's logs
        **counts,
        **summary(samples, args.warmup, args.bar_mib),
        "samples": [asdict(s) for s in samples],
    }
    print(table(result))
    print(f"{args.rounds} rounds in {result['duration_s']:.0f} s; {counts}; logs in {work}")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["within_bar"] else 1


if __name__ == "__main__":
    sys.exit(main())
