"""Print the GPU metrics this host's NVML gives, as the exporter would serve them.

A quick check on a GPU host that NVML works and what the exporter will see:

    .venv/bin/python scripts/gpu_exposition.py
    .venv/bin/python scripts/gpu_exposition.py --target coder=12345 --weight-bytes coder=1.5e9

`--target NAME=PID` adds that process's share of GPU memory; `--weight-bytes NAME=BYTES` (the
weight bytes one generated token reads) adds its memory-bandwidth ceiling.
"""

from __future__ import annotations

import argparse

from prometheus_client import CollectorRegistry, generate_latest

from exporter.gpu.collector import GpuCollector
from exporter.gpu.nvml import Nvml


def pairs(values: list[str]) -> dict[str, str]:
    return dict(v.split("=", 1) for v in values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--target", action="append", default=[], metavar="NAME=PID")
    parser.add_argument("--weight-bytes", action="append", default=[], metavar="NAME=BYTES")
    args = parser.parse_args()
    pids: dict[str, int | None] = {k: int(v) for k, v in pairs(args.target).items()}
    weights = {k: ("model", int(float(v))) for k, v in pairs(args.weight_bytes).items()}
    nvml = Nvml()
    registry = CollectorRegistry()
    registry.register(GpuCollector(nvml, lambda: pids, lambda: weights))
    try:
        print(generate_latest(registry).decode(), end="")
    finally:
        nvml.close()


if __name__ == "__main__":
    main()
