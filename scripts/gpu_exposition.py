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

from exporter.collectors.gpu import GpuCollector
from exporter.collectors.guard import GuardedCollectors
from exporter.gpu.nvml import Nvml
from exporter.kv.facts import ModelFacts
from exporter.llama.discovery import ServerInfo
from exporter.state.store import TargetState


def pairs(values: list[str]) -> dict[str, str]:
    return dict(v.split("=", 1) for v in values)


def served(name: str, weight_bytes: int) -> TargetState:
    """A target that is up, serving a model that reads `weight_bytes` per generated token."""
    server = ServerInfo(
        model="model", model_path="", ctx=0, slots=1, quant="", build="", n_vocab=1,
        n_params=None, size_bytes=None, n_ctx_train=None, slots_endpoint=True,
        metrics_endpoint=False,
    )  # fmt: skip
    facts = ModelFacts("f16", "f16", 0, None, weight_bytes)
    return TargetState(name, "", up=True, server=server, model_facts=facts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--target", action="append", default=[], metavar="NAME=PID")
    parser.add_argument("--weight-bytes", action="append", default=[], metavar="NAME=BYTES")
    args = parser.parse_args()
    pids: dict[str, int | None] = {k: int(v) for k, v in pairs(args.target).items()}
    targets = [served(name, int(float(v))) for name, v in pairs(args.weight_bytes).items()]
    nvml = Nvml()
    registry = CollectorRegistry()
    collectors = [("gpu", GpuCollector(nvml, lambda: pids))]
    registry.register(GuardedCollectors(lambda: targets, collectors, ("script", "")))
    try:
        print(generate_latest(registry).decode(), end="")
    finally:
        nvml.close()


if __name__ == "__main__":
    main()
