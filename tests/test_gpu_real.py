"""Real NVIDIA GPUs through `Nvml` and `GpuCollector`; skipped where no NVIDIA driver answers.

They check what a fake cannot: that real pynvml's units and return types land in base units and
plausible ranges, and that the collector renders a parseable exposition from real devices.
Nothing but pynvml, pytest, prometheus_client and the exporter is needed; no GPU load is made.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from exporter.bench.memory import MemoryPeak, host_gpus
from exporter.collectors.gpu import GPU_METRICS, GpuCollector
from exporter.collectors.guard import GuardedCollectors
from exporter.gpu.nvml import REASONS, GpuReading, Nvml

UUID = re.compile(r"^(GPU|MIG)-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
PCI_BUS_ID = re.compile(r"^[0-9A-Fa-f]{4,8}:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}\.[0-7]$")
DRIVER_VERSION = re.compile(r"^\d+\.\d+(\.\d+)?$")
MIB = 1024**2
TIB = 1024**4
PROCESS_FIELDS = ("compute_processes", "graphics_processes")


@pytest.fixture(scope="module")
def pynvml() -> Iterator[Any]:
    """The real pynvml, initialized; skips the module where no NVIDIA driver answers."""
    try:
        import pynvml  # noqa: PLC0415  # only here: the skip needs to catch its absence
    except ImportError as exc:
        pytest.skip(f"pynvml (nvidia-ml-py) is not installed: {exc}")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        pytest.skip(f"no usable NVIDIA driver: nvmlInit failed with {type(exc).__name__}: {exc}")
    try:
        if pynvml.nvmlDeviceGetCount() == 0:
            pytest.skip("the NVIDIA driver answers but lists no GPU")
        yield pynvml
    finally:
        pynvml.nvmlShutdown()


@pytest.fixture
def nvml(pynvml: Any) -> Iterator[Nvml]:
    n = Nvml(pynvml)
    yield n
    n.close()


@pytest.fixture
def reading(nvml: Nvml) -> GpuReading:
    return nvml.read()


def test_every_gpu_is_read(pynvml: Any, reading: GpuReading) -> None:
    assert [g.index for g in reading.gpus] == list(range(pynvml.nvmlDeviceGetCount()))
    # Dropped GPUs and failed values are errors; NOT_SUPPORTED ones are silently None. A
    # container may be refused the process lists, and only those.
    unexpected = [
        e for e in reading.errors
        if not (e.reason == "no_permission" and e.field in PROCESS_FIELDS)
    ]  # fmt: skip
    assert unexpected == [], unexpected
    assert reading.driver_version is not None
    assert DRIVER_VERSION.match(reading.driver_version), reading.driver_version


def test_identity(reading: GpuReading) -> None:
    uuids = [g.uuid for g in reading.gpus]
    assert len(set(uuids)) == len(uuids)
    for g in reading.gpus:
        assert UUID.match(g.uuid), g.uuid
        assert g.name.strip() and g.name.isprintable(), g.name
        assert PCI_BUS_ID.match(g.pci_bus_id), g.pci_bus_id


def test_memory_in_bytes_matches_pynvml(pynvml: Any, reading: GpuReading) -> None:
    for g in reading.gpus:
        if g.memory_total_bytes is None:  # unified-memory devices report no dedicated memory
            assert g.memory_used_bytes is None
            continue
        assert g.memory_used_bytes is not None
        # Bytes, not MiB: any discrete GPU has more than 256 MiB and less than a TiB.
        assert 256 * MIB < g.memory_total_bytes < TIB
        assert 0 <= g.memory_used_bytes < g.memory_total_bytes
        direct = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(g.index))
        assert g.memory_total_bytes == direct.total


def test_readings_are_in_plausible_ranges(reading: GpuReading) -> None:
    for g in reading.gpus:
        if g.utilization_ratio is not None:  # a ratio, not a percentage
            assert 0.0 <= g.utilization_ratio <= 1.0
        if g.power_watts is not None:  # watts, not milliwatts
            assert 0.0 <= g.power_watts < 2000.0
        if g.temperature_celsius is not None:
            assert 0 < g.temperature_celsius < 120
        if g.energy_joules is not None:  # joules, not millijoules: 2 kW for a year is < 7e10
            assert 0.0 <= g.energy_joules < 7e10
        if g.memory_bus_width_bits is not None:
            assert 32 <= g.memory_bus_width_bits <= 8192
        if g.max_memory_clock_mhz is not None:
            assert 100 <= g.max_memory_clock_mhz <= 40_000
        for p in g.processes or ():
            assert p.pid > 0
            assert p.used_bytes is None or 0 <= p.used_bytes <= (g.memory_total_bytes or TIB)
        if g.processes is not None:
            assert len({p.pid for p in g.processes}) == len(g.processes)


def test_energy_counter_is_monotonic(pynvml: Any, nvml: Nvml) -> None:
    first = nvml.energy_joules()
    if first is None:
        pytest.skip("a GPU here has no energy counter (NVML supports it from Volta on)")
    # A few NVML round trips, so the driver's counter has a chance to advance.
    for _ in range(20):
        nvml.read()
    second = nvml.energy_joules()
    assert second is not None
    assert second >= first
    per_gpu = [g.energy_joules for g in nvml.read().gpus]
    assert all(e is not None for e in per_gpu)
    assert sum(e for e in per_gpu if e is not None) >= second


def test_nvml_is_initialized_once_and_closed(pynvml: Any) -> None:
    refcount = getattr(pynvml, "_nvmlLib_refcount", None)
    if not isinstance(refcount, int):
        pytest.skip("this pynvml keeps no _nvmlLib_refcount to observe")
    nvml = Nvml(pynvml)
    a, b = nvml.read(), nvml.read()
    nvml.energy_joules()
    assert pynvml._nvmlLib_refcount == refcount + 1
    assert [g.uuid for g in a.gpus] == [g.uuid for g in b.gpus]
    nvml.close()
    assert pynvml._nvmlLib_refcount == refcount


def test_collector_renders_real_gpus(pynvml: Any, nvml: Nvml, reading: GpuReading) -> None:
    # A pid NVML lists as holding memory stands in for llama-server, when there is one.
    holder = next(
        (
            (g, p)
            for g in reading.gpus
            for p in g.processes or ()
            if p.used_bytes is not None and p.used_bytes > 0
        ),
        None,
    )
    pids = {"gpu-holder": holder[1].pid if holder else None, "absent": None}
    registry = CollectorRegistry()
    registry.register(
        GuardedCollectors(tuple, [("gpu", GpuCollector(nvml, lambda: pids))], ("", ""))
    )
    text = generate_latest(registry).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for metric in GPU_METRICS:
        assert families[metric.name].type == metric.type

    def series(name: str) -> dict[str, float]:
        return {s.labels["uuid"]: s.value for s in families[name].samples}

    assert [s.value for s in families["llama_speed_gpu_up"].samples] == [1.0]
    errors = {s.labels["reason"]: s.value for s in families["llama_speed_gpu_errors"].samples}
    assert set(errors) == set(REASONS)
    uuids = {g.uuid for g in reading.gpus}
    assert set(series("llama_speed_gpu_info")) == uuids
    info = families["llama_speed_gpu_info"].samples[0].labels
    assert info["driver_version"] == reading.driver_version
    total = series("llama_speed_gpu_memory_total_bytes")
    used = series("llama_speed_gpu_memory_used_bytes")
    for uuid, t in total.items():
        assert 0 <= used[uuid] < t
    for name in ("llama_speed_gpu_utilization_ratio",):
        assert all(0.0 <= v <= 1.0 for v in series(name).values())
    process = families["llama_speed_gpu_process_memory_used_bytes"].samples
    assert all(s.labels["target"] == "gpu-holder" for s in process)
    if holder is not None:
        assert any(s.labels["uuid"] == holder[0].uuid for s in process)
        for s in process:
            assert 0 < s.value <= total.get(s.labels["uuid"], TIB)


def test_bench_memory_peak_reads_every_gpu(nvml: Nvml, reading: GpuReading) -> None:
    """`bench`'s per-run reading: whole-GPU memory, and nothing held by a process that has no
    CUDA context (this test's own)."""
    peak = MemoryPeak(nvml, lambda: {os.getpid()})
    peak.sample()
    assert [g.index for g in peak.gpus] == [g.index for g in reading.gpus]
    assert peak.note == ""
    for gpu in peak.gpus:
        assert gpu.total_bytes is None or gpu.total_bytes > 0
        if gpu.used_bytes is not None and gpu.total_bytes is not None:
            assert 0 <= gpu.used_bytes <= gpu.total_bytes
        assert gpu.server_bytes in (0, None)  # None where the process lists are refused
    gpus, driver = host_gpus(nvml)
    assert [g.name for g in gpus] == [g.name for g in reading.gpus]
    assert driver == reading.driver_version
