"""The demo: a real llama-server on a generated tiny model, and the exporter probing it.

Run by `scripts/demo.sh`, or `python -m testbed.demo` where the `demo` extra is installed.
Everything is real except the model, whose weights are random: the speeds are genuine
measurements of llama.cpp on this machine, the text it generates is noise.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

import structlog

from exporter import log
from exporter.config import Config, Target
from exporter.daemon import Daemon
from exporter.llama.server_process import ServerStartError
from exporter.probe.plan import MeasurePlan
from exporter.schedule.plan import Schedule
from testbed.llama_server import LlamaServerProcess
from testbed.tiny_model import write_tiny_model

logger = structlog.get_logger("demo")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testbed.demo", description=__doc__)
    parser.add_argument("--dir", type=Path, default=Path(".demo"), help="model and logs")
    parser.add_argument("--listen", default="127.0.0.1:18088", help="exporter address")
    parser.add_argument("--interval", type=float, default=15.0, help="seconds between probes")
    args = parser.parse_args(argv)
    log.configure("console", "info")

    args.dir.mkdir(parents=True, exist_ok=True)
    model = args.dir / "tiny.gguf"
    if not model.exists():
        write_tiny_model(model, n_layer=6, n_embd=384, n_head=6, n_head_kv=2, n_ff=1024)
    # --metrics lets the dashboards compare the probes with llama-server's own counters.
    server = LlamaServerProcess(
        model, ["-c", "8192", "--metrics", "-np", "2"], log_path=args.dir / "llama-server.log"
    )
    try:
        server.start()
        server.wait_ready(120)
    except ServerStartError as exc:
        print(f"demo: llama-server did not start: {exc}", file=sys.stderr)
        server.stop()
        return 1
    plan = MeasurePlan(timeout=min(60.0, args.interval - 2), depths=(0, 2048))
    schedule = Schedule(
        interval=args.interval,
        jitter=1.0,
        discovery_interval=min(10.0, args.interval),
        duty_budget=0.5,  # the demo server has no production traffic to protect
    )
    target = Target("demo", server.url, plan=plan, schedule=schedule)
    config = Config((target,), args.listen, "/metrics", "console", "info")
    try:
        daemon = Daemon(config)
    except OSError as exc:
        print(f"demo: cannot listen on {args.listen}: {exc.strerror}", file=sys.stderr)
        server.stop()
        return 1
    host, _, port = args.listen.rpartition(":")
    print(
        f"\nllama-server: {server.url} (log {server.log_path})\n"
        f"exporter:     http://{host}:{port}/  metrics: http://{host}:{port}/metrics\n"
        "Ctrl-C stops both.\n",
        flush=True,
    )
    try:
        asyncio.run(daemon.run())
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
