"""How much memory a benchmarked server takes: per GPU (NVML) and on the host (/proc).

A bench reports the peak over the run, sampled from when the server is ready to the end of its
probes: the figure that decides whether a context fits is the highest one, not the last one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from exporter.bench.record import GpuMemory, HostGpu
from exporter.gpu.nvml import GpuReading, GpuUnavailable, Nvml
from exporter.host.proc import PROC, rss_bytes

log = structlog.get_logger(__name__)


@dataclass
class MemoryPeak:
    """The highest memory figures seen over a run, one `sample()` at a time."""

    nvml: Nvml | None
    pids: Callable[[], set[int]]
    proc_root: Path = PROC
    _gpus: dict[int, GpuMemory] = field(default_factory=dict)
    _rss: int | None = None
    _note: str = ""

    def sample(self) -> None:
        pids = self.pids()
        rss = rss_bytes(pids, proc_root=self.proc_root)
        if rss is not None:
            self._rss = max(rss, self._rss or 0)
        if self.nvml is None:
            self._note = "GPU memory not read (--no-gpu)"
            return
        try:
            reading = self.nvml.read()
        except GpuUnavailable as exc:
            self._note = f"no GPU figures: NVML {exc.reason}" + (
                f" ({exc.detail})" if exc.detail else ""
            )
            return
        self._merge(reading, pids)

    def _merge(self, reading: GpuReading, pids: set[int]) -> None:
        partial_lists = {
            e.gpu for e in reading.errors if e.field in ("compute_processes", "graphics_processes")
        }
        for gpu in reading.gpus:
            held = None
            if gpu.processes is not None:
                known = [p.used_bytes for p in gpu.processes if p.pid in pids]
                if known:
                    held = sum(b for b in known if b is not None)
                elif gpu.index not in partial_lists:
                    # Absent from a complete list: the server holds nothing on this GPU. Absent
                    # from a half-read one says nothing.
                    held = 0
            old = self._gpus.get(gpu.index)
            self._gpus[gpu.index] = GpuMemory(
                index=gpu.index,
                name=gpu.name,
                used_bytes=_max(old.used_bytes if old else None, gpu.memory_used_bytes),
                total_bytes=gpu.memory_total_bytes,
                server_bytes=_max(old.server_bytes if old else None, held),
            )
        self._note = ""

    @property
    def gpus(self) -> tuple[GpuMemory, ...]:
        return tuple(self._gpus[i] for i in sorted(self._gpus))

    @property
    def note(self) -> str:
        return "" if self._gpus else self._note

    @property
    def rss(self) -> int | None:
        return self._rss


def _max(a: int | None, b: int | None) -> int | None:
    if a is None:
        return b
    return a if b is None else max(a, b)


def host_gpus(nvml: Nvml | None) -> tuple[tuple[HostGpu, ...], str | None]:
    """The GPUs and driver for the report's hardware line; none without NVML."""
    if nvml is None:
        return (), None
    try:
        reading = nvml.read()
    except GpuUnavailable:
        return (), None
    gpus = tuple(HostGpu(index=g.index, name=g.name, total_bytes=g.memory_total_bytes)
                 for g in reading.gpus)  # fmt: skip
    return gpus, reading.driver_version
