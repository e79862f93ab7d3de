"""The daemon's resident memory after N probe rounds against a real llama-server.

Starts the testbed's llama-server on a generated tiny model, then, for each interpreter given
(each a virtualenv where one version of the exporter is installed with `pip install .`), runs
`python -m exporter` against it, waits until N rounds are recorded, and reads the process's
VmRSS and VmHWM. The exporters run one after the other, alternating, `--repeats` times, and the
medians are printed: side by side in one run, on the same server, as this machine's noise
requires.

    python scripts/daemon_memory.py --python /tmp/before/bin/python --python /tmp/after/bin/python

Settings go through the environment, which every version reads the same way.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from exporter.llama.server_process import free_port
from testbed.llama_server import LlamaServerProcess
from testbed.tiny_model import write_tiny_model

FAST_ROUNDS = {
    "LLAMA_SPEED_PROBE_INTERVAL": "3",
    "LLAMA_SPEED_PROBE_TIMEOUT": "2.5",
    "LLAMA_SPEED_PROBE_JITTER": "0",
    "LLAMA_SPEED_PROBE_DISCOVERY_INTERVAL": "1",
    "LLAMA_SPEED_PROBE_PROMPT_TOKENS": "128",
    "LLAMA_SPEED_PROBE_GENERATION_TOKENS": "16",
    "LLAMA_SPEED_PROBE_DUTY_BUDGET": "1",
    "LLAMA_SPEED_LOG_FORMAT": "json",
    "LLAMA_SPEED_LOG_LEVEL": "warning",
}
ROUND_DEADLINE_S = 20.0


def rounds_done(text: str) -> int:
    for line in text.splitlines():
        if line.startswith('llama_speed_probes_total{probe="generation"'):
            return int(float(line.rpartition(" ")[2]))
    return 0


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise LookupError(field)


def measure(python: str, url: str, rounds: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) in MiB once `rounds` rounds are recorded."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_SPEED_")}
    env |= FAST_ROUNDS | {
        "LLAMA_SPEED_TARGET": url,
        "LLAMA_SPEED_WEB_LISTEN_ADDRESS": f"127.0.0.1:{port}",
    }
    # From a directory of its own: `-m` puts the working directory first on the path, and a
    # checkout there would be run instead of the version installed in `python`'s environment.
    proc = subprocess.Popen(
        [python, "-m", "exporter"], env=env, stderr=subprocess.DEVNULL, cwd=tempfile.gettempdir()
    )
    try:
        deadline = time.monotonic() + rounds * ROUND_DEADLINE_S
        while True:
            try:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
            except httpx.TransportError:
                text = ""
            if rounds_done(text) >= rounds:
                break
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"{python}: {rounds} rounds not reached")
            time.sleep(0.2)  # poll interval inside a deadline
        return status_kib(proc.pid, "VmRSS") / 1024, status_kib(proc.pid, "VmHWM") / 1024
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--python", action="append", required=True, metavar="PATH")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model = write_tiny_model(Path(tempfile.mkdtemp(prefix="daemon-memory-")) / "tiny.gguf")
    results: dict[str, list[tuple[float, float]]] = {p: [] for p in args.python}
    with LlamaServerProcess(model, ["-c", "4096"]) as server:
        for _ in range(args.repeats):
            for python in args.python:
                results[python].append(measure(python, server.url, args.rounds))
    print(f"| exporter (interpreter) | RSS after {args.rounds} rounds, MiB | peak RSS, MiB |")
    print("|---|---|---|")
    for python, values in results.items():
        rss = statistics.median(v[0] for v in values)
        hwm = statistics.median(v[1] for v in values)
        print(f"| `{python}` | {rss:.1f} | {hwm:.1f} |")


if __name__ == "__main__":
    main()
