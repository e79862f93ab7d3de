"""GPU state read from NVML at scrape time, and each target's own share of GPU memory.

NVML reads are cheap (milliseconds), so nothing here is cached or scheduled: every scrape reads
afresh, and a GPU or value that stops answering disappears from the next scrape. The collector
never raises on NVML's account: `llama_speed_gpu_up` and `llama_speed_gpu_errors_total` say
what went wrong instead.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping, Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.core import Metric as Family

from exporter.collectors.catalogue import (
    GENERATION_CEILING,
    GPU_ENERGY,
    GPU_ERRORS,
    GPU_INFO,
    GPU_MEMORY_TOTAL,
    GPU_MEMORY_USED,
    GPU_METRICS,
    GPU_MODEL_MEMORY,
    GPU_POWER,
    GPU_PROCESS_MEMORY,
    GPU_TEMPERATURE,
    GPU_UP,
    GPU_UTILIZATION,
)
from exporter.gpu.nvml import REASONS, GpuReading, GpuSample, GpuUnavailable, Nvml, Reason
from exporter.kv.ceiling import GpuShare, generation_ceiling
from exporter.state.store import TargetState

__all__ = ["GPU_METRICS", "GpuCollector"]

_Family = GaugeMetricFamily | CounterMetricFamily


class GpuCollector:
    """`target_pids` maps each target's name to its llama-server's pid, None when not found."""

    def __init__(self, nvml: Nvml, target_pids: Callable[[], Mapping[str, int | None]]) -> None:
        self._nvml = nvml
        self._target_pids = target_pids
        # Every reason from the start, at 0: rate() needs the series before its first failure.
        self._errors: dict[Reason, int] = dict.fromkeys(REASONS, 0)
        self._errors_lock = threading.Lock()  # concurrent scrapes both count

    def collect(self, targets: Sequence[TargetState]) -> Iterable[Family]:
        up = GPU_UP.family()
        try:
            reading = self._nvml.read()
        except GpuUnavailable as exc:
            # What an unanswering NVML would report is unknown: every GPU series disappears.
            up.add_metric([], 0.0)
            yield from (up, self._count([exc.reason]))
            return
        up.add_metric([], 1.0)
        families = self._render(reading, targets)
        yield from (up, self._count(e.reason for e in reading.errors), *families)

    def _count(self, reasons: Iterable[Reason]) -> Family:
        family = GPU_ERRORS.family()
        with self._errors_lock:
            for reason in reasons:
                self._errors[reason] += 1
            counts = dict(self._errors)
        for reason, count in counts.items():
            family.add_metric([reason], float(count))
        return family

    def _render(self, reading: GpuReading, targets: Sequence[TargetState]) -> list[Family]:
        info = GPU_INFO.family()
        per_gpu: list[tuple[_Family, Callable[[GpuSample], float | None]]] = [
            (GPU_MEMORY_USED.family(), lambda g: g.memory_used_bytes),
            (GPU_MEMORY_TOTAL.family(), lambda g: g.memory_total_bytes),
            (GPU_UTILIZATION.family(), lambda g: g.utilization_ratio),
            (GPU_POWER.family(), lambda g: g.power_watts),
            (GPU_ENERGY.family(), lambda g: g.energy_joules),
            (GPU_TEMPERATURE.family(), lambda g: g.temperature_celsius),
        ]
        driver = reading.driver_version or ""
        for g in reading.gpus:
            labels = [str(g.index), g.uuid, g.name]
            info.add_metric([str(g.index), g.uuid, g.name, driver, g.pci_bus_id], 1.0)
            for family, value_of in per_gpu:
                value = value_of(g)
                if value is not None:  # unsupported or failed: omitted, never a sentinel
                    family.add_metric(labels, float(value))
        process, ceiling = GPU_PROCESS_MEMORY.family(), GENERATION_CEILING.family()
        per_model = GPU_MODEL_MEMORY.family()
        weights = _weight_bytes(targets)
        for target, pid in sorted(self._target_pids().items()):
            if pid is None:
                continue
            shares, complete = _shares(reading, pid, [target], process)
            if target in weights and shares and complete:
                model, per_token = weights[target]
                bound = generation_ceiling(per_token, shares)
                if bound is not None:
                    ceiling.add_metric([target, model], bound)
        _per_model(reading, targets, per_model, ceiling)
        return [info, *(family for family, _ in per_gpu), process, per_model, ceiling]


def _per_model(
    reading: GpuReading, targets: Sequence[TargetState], memory: _Family, ceiling: _Family
) -> None:
    """Behind a router or llama-swap each model has a process of its own (the router's
    child): its memory and its bound are the model's."""
    for t in targets:
        if not t.multi:
            continue
        for view in t.views():
            if view.pid is None or view.server is None:
                continue
            labels = [t.name, view.server.model]
            shares, complete = _shares(reading, view.pid, labels, memory)
            facts = view.model_facts
            if facts is not None and shares and complete:
                bound = generation_ceiling(facts.weight_bytes_per_token, shares)
                if bound is not None:
                    ceiling.add_metric(labels, bound)


def _shares(
    reading: GpuReading, pid: int, labels: list[str], memory: _Family
) -> tuple[list[GpuShare], bool]:
    """`pid`'s memory on each GPU, added to `memory` under `labels`, and its shares of the
    GPUs for the generation bound; False where a GPU's bandwidth is unknown, which would make
    the bound too high."""
    shares: list[GpuShare] = []
    complete = True
    for g in reading.gpus:
        used = next((p.used_bytes for p in g.processes or () if p.pid == pid), None)
        if used is None:  # only GPUs where the process holds memory
            continue
        memory.add_metric([*labels, str(g.index), g.uuid], float(used))
        if g.memory_bus_width_bits and g.max_memory_clock_mhz:
            shares.append(GpuShare(used, g.memory_bus_width_bits, g.max_memory_clock_mhz))
        else:
            complete = False
    return shares, complete


def _weight_bytes(targets: Sequence[TargetState]) -> dict[str, tuple[str, int]]:
    """Per target that is up: its model and the weight bytes one generated token reads."""
    return {
        t.name: (t.server.model, t.model_facts.weight_bytes_per_token)
        for t in targets
        if t.up and t.server is not None and t.model_facts is not None
    }
