"""GPU readings through a fake pynvml (two RTX 3060), and process discovery over a fake /proc."""

from __future__ import annotations

import inspect
import os
import socket
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import structlog
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric as Family
from prometheus_client.parser import text_string_to_metric_families

from exporter.collectors.gpu import GPU_METRICS, GpuCollector
from exporter.collectors.guard import GuardedCollectors
from exporter.gpu.nvml import (
    DEFAULT_RETRY_INTERVAL_S,
    REASONS,
    GpuProcess,
    GpuUnavailable,
    Nvml,
)
from exporter.host import proc as process
from tests import fake_pynvml as fk
from tests.fake_pynvml import FakePynvml

GPU0 = ("0", "GPU-5b7f0c3e-2d41-8a9e-6f12-3c4d5e6f7a80", "NVIDIA GeForce RTX 3060")
GPU1 = ("1", "GPU-a1b2c3d4-e5f6-4789-9abc-def012345678", "NVIDIA GeForce RTX 3060")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Rig:
    fake: FakePynvml = field(default_factory=FakePynvml)
    clock: Clock = field(default_factory=Clock)
    pids: dict[str, int | None] = field(default_factory=lambda: {"prod": fk.LLAMA_PID})

    def __post_init__(self) -> None:
        self.nvml = Nvml(self.fake, clock=self.clock)
        self.collector = GpuCollector(self.nvml, lambda: self.pids)

    def scrape(self) -> dict[str, dict[tuple[str, ...], float]]:
        return samples(self.collector.collect(()))


def samples(families: Iterable[Family]) -> dict[str, dict[tuple[str, ...], float]]:
    """Series by family name, keyed by their label values in the family's label order."""
    out: dict[str, dict[tuple[str, ...], float]] = {}
    for family in families:
        series = out.setdefault(family.name, {})
        for s in family.samples:
            series[tuple(s.labels.values())] = s.value
    return out


def errors_of(scrape: Mapping[str, Mapping[tuple[str, ...], float]]) -> dict[str, float]:
    return {labels[0]: v for labels, v in scrape["llama_speed_gpu_errors"].items() if v}


def events(logs: Sequence[Mapping[str, Any]], name: str) -> list[Mapping[str, Any]]:
    return [e for e in logs if e["event"] == name]


# --- the fake itself ---


def test_fake_matches_real_pynvml_names_codes_and_signatures() -> None:
    import pynvml  # noqa: PLC0415  # the real module imports without a driver

    for name, cls in fk.ERROR_CLASSES.items():
        real = getattr(pynvml, name)
        assert issubclass(real, pynvml.NVMLError), name
        assert real().value == cls().value, name
        assert type(pynvml.NVMLError(cls.code)) is real
        assert type(fk.NVMLError(cls.code)) is cls
    real_classes = {n for n in dir(pynvml) if n.startswith("NVMLError_")}
    assert real_classes == set(fk.ERROR_CLASSES)
    for name, value in fk.CONSTANTS.items():
        assert getattr(pynvml, name) == value, name
    fake = FakePynvml()
    for name in fk.PYNVML_FUNCTIONS:
        real_params = list(inspect.signature(getattr(pynvml, name)).parameters)
        assert list(inspect.signature(getattr(fake, name)).parameters) == real_params, name


def test_fake_raises_uninitialized_before_init_like_pynvml() -> None:
    fake = FakePynvml()
    with pytest.raises(fk.NVMLError_Uninitialized):
        fake.nvmlDeviceGetCount()


# --- reading two cards ---


def test_two_rtx_3060_read_in_base_units() -> None:
    reading = Nvml(FakePynvml()).read()
    assert reading.driver_version == "580.95.05"
    assert reading.errors == ()
    g0, g1 = reading.gpus
    assert (g0.index, g0.uuid, g0.name, g0.pci_bus_id) == (0, GPU0[1], GPU0[2], "00000000:01:00.0")
    assert g0.memory_total_bytes == 12_884_901_888
    assert g0.memory_used_bytes == fk.LLAMA_GPU0_BYTES + fk.XORG_BYTES + fk.DRIVER_RESERVED
    assert g0.utilization_ratio == pytest.approx(0.87)
    assert g0.power_watts == pytest.approx(112.345)
    assert g0.energy_joules == pytest.approx(1_234_567.890)
    assert g0.temperature_celsius == 61
    assert g0.memory_bus_width_bits == 192
    assert g0.max_memory_clock_mhz == 7501
    assert g0.processes == (
        GpuProcess(fk.XORG_PID, fk.XORG_BYTES),
        GpuProcess(fk.LLAMA_PID, fk.LLAMA_GPU0_BYTES),
    )
    assert g1.index == 1
    assert g1.pci_bus_id == "00000000:02:00.0"
    assert g1.processes == (GpuProcess(fk.LLAMA_PID, fk.LLAMA_GPU1_BYTES),)


def test_collector_renders_both_cards_and_the_targets_share() -> None:
    rig = Rig()
    rig.pids = {"prod": fk.LLAMA_PID, "elsewhere": None, "cpu-only": 777}
    s = rig.scrape()
    assert s["llama_speed_gpu_up"] == {(): 1.0}
    assert errors_of(s) == {}
    assert set(s["llama_speed_gpu_errors"]) == {(r,) for r in REASONS}
    assert s["llama_speed_gpu_memory_total_bytes"] == {GPU0: 12_884_901_888, GPU1: 12_884_901_888}
    assert s["llama_speed_gpu_memory_used_bytes"][GPU0] == 9_693_036_544
    assert s["llama_speed_gpu_memory_used_bytes"][GPU1] == 9_101_639_680
    assert s["llama_speed_gpu_utilization_ratio"] == {GPU0: 0.87, GPU1: 0.83}
    assert s["llama_speed_gpu_power_watts"] == {GPU0: 112.345, GPU1: 98.765}
    assert s["llama_speed_gpu_energy_joules"] == {GPU0: 1_234_567.89, GPU1: 1_098_765.432}
    assert s["llama_speed_gpu_temperature_celsius"] == {GPU0: 61.0, GPU1: 57.0}
    assert s["llama_speed_gpu_info"] == {
        (*GPU0, "580.95.05", "00000000:01:00.0"): 1.0,
        (*GPU1, "580.95.05", "00000000:02:00.0"): 1.0,
    }
    # ~9.4 GB and ~8.8 GB; targets without a pid or without GPU memory get no series.
    assert s["llama_speed_gpu_process_memory_used_bytes"] == {
        ("prod", "0", GPU0[1]): 9_395_240_960,
        ("prod", "1", GPU1[1]): 8_808_038_400,
    }


def test_exposition_uses_catalogue_names_and_parses() -> None:
    registry = CollectorRegistry()
    registry.register(GuardedCollectors(tuple, [("gpu", Rig().collector)], ("", "")))
    text = generate_latest(registry).decode()
    assert "llama_speed_gpu_energy_joules_total{" in text
    assert 'llama_speed_gpu_errors_total{reason="gpu_lost"} 0.0' in text
    parsed = {f.name: f for f in text_string_to_metric_families(text)}
    for metric in GPU_METRICS:
        assert parsed[metric.name].type == metric.type
        assert parsed[metric.name].documentation == metric.help
        for sample in parsed[metric.name].samples:
            assert set(sample.labels) == set(metric.labels)


def test_a_process_in_both_compute_and_graphics_lists_is_counted_once() -> None:
    fake = FakePynvml()
    fake.gpus[0].graphics_processes.append(fk.FakeProcess(fk.LLAMA_PID, fk.LLAMA_GPU0_BYTES))
    # A listing without the figure must not hide the one that has it.
    fake.gpus[1].graphics_processes.append(fk.FakeProcess(fk.LLAMA_PID, None))
    rig = Rig(fake=fake)
    series = rig.scrape()["llama_speed_gpu_process_memory_used_bytes"]
    assert series == {
        ("prod", "0", GPU0[1]): fk.LLAMA_GPU0_BYTES,
        ("prod", "1", GPU1[1]): fk.LLAMA_GPU1_BYTES,
    }


def test_process_memory_nvml_cannot_attribute_is_omitted() -> None:
    fake = FakePynvml()
    fake.gpus[1].compute_processes = [fk.FakeProcess(fk.LLAMA_PID, None)]  # WDDM, MIG
    series = Rig(fake=fake).scrape()["llama_speed_gpu_process_memory_used_bytes"]
    assert series == {("prod", "0", GPU0[1]): fk.LLAMA_GPU0_BYTES}


def test_the_target_on_one_gpu_only_has_one_series() -> None:
    fake = FakePynvml()
    fake.gpus[1].compute_processes = []
    series = Rig(fake=fake).scrape()["llama_speed_gpu_process_memory_used_bytes"]
    assert series == {("prod", "0", GPU0[1]): fk.LLAMA_GPU0_BYTES}


# --- values NVML does not support, or fails to give ---


def test_not_supported_values_are_omitted_silently() -> None:
    rig = Rig()
    rig.fake.fail("nvmlDeviceGetPowerUsage", fk.NVMLError_NotSupported)
    rig.fake.fail("nvmlDeviceGetTotalEnergyConsumption", fk.NVMLError_NotSupported)
    rig.fake.fail("nvmlDeviceGetTemperature", fk.NVMLError_NotSupported, gpu=1)
    rig.fake.fail("nvmlDeviceGetGraphicsRunningProcesses", fk.NVMLError_NotSupported)
    with structlog.testing.capture_logs() as logs:
        reading = rig.nvml.read()
        s = rig.scrape()
    assert reading.errors == ()
    g0, g1 = reading.gpus
    assert (g0.power_watts, g0.energy_joules, g1.temperature_celsius) == (None, None, None)
    assert g0.temperature_celsius == 61
    assert g0.processes == (GpuProcess(fk.LLAMA_PID, fk.LLAMA_GPU0_BYTES),)  # compute only
    assert s["llama_speed_gpu_power_watts"] == {}
    assert s["llama_speed_gpu_energy_joules"] == {}
    assert s["llama_speed_gpu_temperature_celsius"] == {GPU0: 61.0}
    assert s["llama_speed_gpu_memory_used_bytes"].keys() == {GPU0, GPU1}
    assert errors_of(s) == {}
    assert [e for e in logs if e["log_level"] == "warning"] == []


def test_unified_memory_device_without_memory_info_keeps_its_other_series() -> None:
    rig = Rig()
    rig.fake.fail("nvmlDeviceGetMemoryInfo", fk.NVMLError_NotSupported, gpu=0)
    s = rig.scrape()
    assert s["llama_speed_gpu_memory_used_bytes"].keys() == {GPU1}
    assert s["llama_speed_gpu_memory_total_bytes"].keys() == {GPU1}
    assert s["llama_speed_gpu_power_watts"].keys() == {GPU0, GPU1}


@pytest.mark.parametrize(
    ("error", "reason"),
    [(fk.NVMLError_NoPermission, "no_permission"), (fk.NVMLError_Timeout, "error")],
)
def test_a_failed_call_drops_its_value_counts_a_reason_and_logs_once(
    error: type[Exception], reason: str
) -> None:
    rig = Rig()
    rig.fake.fail("nvmlDeviceGetUtilizationRates", error, gpu=1)
    with structlog.testing.capture_logs() as logs:
        scrapes = [rig.scrape() for _ in range(3)]
        rig.fake.heal()
        healed = rig.scrape()
    for s in scrapes:
        assert s["llama_speed_gpu_up"] == {(): 1.0}
        assert s["llama_speed_gpu_utilization_ratio"] == {GPU0: 0.87}
        assert s["llama_speed_gpu_power_watts"].keys() == {GPU0, GPU1}
    assert errors_of(scrapes[-1]) == {reason: 3}
    assert errors_of(healed) == {reason: 3}
    assert healed["llama_speed_gpu_utilization_ratio"].keys() == {GPU0, GPU1}
    (failed,) = events(logs, "gpu_value_failed")
    assert (failed["gpu"], failed["field"], failed["reason"]) == (1, "utilization", reason)
    (recovered,) = events(logs, "gpu_recovered")
    assert (recovered["gpu"], recovered["field"]) == (1, "utilization")


def test_a_non_nvml_exception_from_a_call_is_an_error_not_a_crash() -> None:
    rig = Rig()
    # What pynvml raises for an unversioned function on an older driver.
    rig.fake.fail("nvmlDeviceGetComputeRunningProcesses", fk.NVMLLibraryMismatchError)
    rig.fake.fail("nvmlDeviceGetGraphicsRunningProcesses", fk.NVMLError_NotSupported)
    reading = rig.nvml.read()
    assert [g.processes for g in reading.gpus] == [None, None]
    assert {(e.gpu, e.field, e.reason) for e in reading.errors} == {
        (0, "compute_processes", "error"),
        (1, "compute_processes", "error"),
    }
    assert rig.scrape()["llama_speed_gpu_process_memory_used_bytes"] == {}


def test_identity_failures_drop_the_gpu() -> None:
    rig = Rig()
    rig.fake.fail("nvmlDeviceGetUUID", fk.NVMLError_Timeout, gpu=0)
    reading = rig.nvml.read()
    assert [g.index for g in reading.gpus] == [1]
    (error,) = reading.errors
    assert (error.reason, error.gpu, error.field) == ("error", 0, None)
    assert "Timeout" in error.detail


def test_failed_name_and_pci_bus_id_are_empty_labels_not_a_dropped_gpu() -> None:
    rig = Rig()
    rig.fake.fail("nvmlDeviceGetName", fk.NVMLError_Timeout, gpu=1)
    rig.fake.fail("nvmlDeviceGetPciInfo", fk.NVMLError_NotSupported, gpu=1)
    s = rig.scrape()
    assert ("1", GPU1[1], "", "580.95.05", "") in s["llama_speed_gpu_info"]
    assert errors_of(s) == {"error": 1}


# --- a GPU lost mid-run ---


@pytest.mark.parametrize(
    ("function", "error"),
    [
        ("*", fk.NVMLError_GpuIsLost),
        ("nvmlDeviceGetHandleByIndex", fk.NVMLError_GpuIsLost),
        ("nvmlDeviceGetMemoryInfo", fk.NVMLError_Unknown),
        ("nvmlDeviceGetPowerUsage", fk.NVMLError_ResetRequired),
    ],
)
def test_a_lost_gpu_disappears_and_the_other_remains(function: str, error: type[Exception]) -> None:
    rig = Rig()
    before = rig.scrape()
    assert before["llama_speed_gpu_memory_used_bytes"].keys() == {GPU0, GPU1}
    rig.fake.fail(function, error, gpu=1)
    with structlog.testing.capture_logs() as logs:
        during = [rig.scrape() for _ in range(2)]
        rig.fake.heal()
        after = rig.scrape()
    for s in during:
        assert s["llama_speed_gpu_up"] == {(): 1.0}
        for name in (
            "llama_speed_gpu_memory_used_bytes",
            "llama_speed_gpu_memory_total_bytes",
            "llama_speed_gpu_power_watts",
            "llama_speed_gpu_temperature_celsius",
        ):
            assert s[name].keys() == {GPU0}, name
        assert [k[:3] for k in s["llama_speed_gpu_info"]] == [GPU0]
        assert s["llama_speed_gpu_process_memory_used_bytes"] == {
            ("prod", "0", GPU0[1]): fk.LLAMA_GPU0_BYTES
        }
    assert errors_of(during[-1]) == {"gpu_lost": 2}
    assert after["llama_speed_gpu_memory_used_bytes"].keys() == {GPU0, GPU1}
    (dropped,) = events(logs, "gpu_dropped")
    assert (dropped["gpu"], dropped["reason"]) == (1, "gpu_lost")
    assert len(events(logs, "gpu_recovered")) == 1


# --- NVML unavailable, and back ---


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (fk.NVMLError_LibraryNotFound, "library_not_found"),
        (fk.NVMLError_DriverNotLoaded, "driver_not_loaded"),
        (fk.NVMLError_LibRmVersionMismatch, "driver_mismatch"),
        (fk.NVMLError_NoPermission, "no_permission"),
        (fk.NVMLError_Unknown, "error"),
        (OSError, "error"),
    ],
)
def test_nvml_unavailable_reports_up_0_with_a_reason_and_logs_once(
    error: type[Exception], reason: str
) -> None:
    rig = Rig()
    rig.fake.fail("nvmlInit", error)
    with structlog.testing.capture_logs() as logs:
        scrapes = [rig.scrape() for _ in range(4)]
        for _ in range(2):  # retries after the interval fail the same way: still one log line
            rig.clock.now += DEFAULT_RETRY_INTERVAL_S
            scrapes.append(rig.scrape())
    for s in scrapes:
        assert set(s) == {"llama_speed_gpu_up", "llama_speed_gpu_errors"}
        assert s["llama_speed_gpu_up"] == {(): 0.0}
    assert errors_of(scrapes[-1]) == {reason: 6}
    assert rig.fake.init_calls == 3  # once, then once per retry interval
    (logged,) = events(logs, "gpu_unavailable")
    assert logged["reason"] == reason
    assert logged["log_level"] == "warning"


def test_nvml_recovers_when_the_driver_comes_back() -> None:
    rig = Rig()
    rig.fake.fail("nvmlInit", fk.NVMLError_DriverNotLoaded)
    with structlog.testing.capture_logs() as logs:
        assert rig.scrape()["llama_speed_gpu_up"] == {(): 0.0}
        rig.fake.heal()
        rig.clock.now += DEFAULT_RETRY_INTERVAL_S / 2
        assert rig.scrape()["llama_speed_gpu_up"] == {(): 0.0}  # not retried yet
        assert rig.fake.init_calls == 1
        rig.clock.now += DEFAULT_RETRY_INTERVAL_S / 2
        s = rig.scrape()
        rig.scrape()
    assert s["llama_speed_gpu_up"] == {(): 1.0}
    assert s["llama_speed_gpu_memory_used_bytes"].keys() == {GPU0, GPU1}
    assert errors_of(s) == {"driver_not_loaded": 2}
    assert rig.fake.init_calls == 2  # initialized once, kept
    assert [e["event"] for e in logs] == ["gpu_unavailable", "gpu_available"]
    assert events(logs, "gpu_available")[0]["gpus"] == 2


def test_driver_gone_mid_run_is_retried_on_the_next_read() -> None:
    rig = Rig()
    assert rig.scrape()["llama_speed_gpu_up"] == {(): 1.0}
    rig.fake.fail("nvmlDeviceGetMemoryInfo", fk.NVMLError_DriverNotLoaded, times=1)
    with structlog.testing.capture_logs() as logs:
        down = rig.scrape()
        up = rig.scrape()  # the clock has not moved: NVML worked a moment ago
    assert down["llama_speed_gpu_up"] == {(): 0.0}
    assert set(down) == {"llama_speed_gpu_up", "llama_speed_gpu_errors"}
    assert up["llama_speed_gpu_up"] == {(): 1.0}
    assert rig.fake.init_calls == 2
    assert rig.fake.shutdown_calls == 1
    assert rig.fake.refcount == 1
    assert [e["event"] for e in logs] == ["gpu_unavailable", "gpu_available"]


def test_no_gpu_is_unavailable_with_its_own_reason() -> None:
    rig = Rig(fake=FakePynvml(gpus=[]))
    s = rig.scrape()
    assert s["llama_speed_gpu_up"] == {(): 0.0}
    assert errors_of(s) == {"no_gpu": 1}
    with pytest.raises(GpuUnavailable) as excinfo:
        rig.nvml.read()
    assert excinfo.value.reason == "no_gpu"
    assert rig.fake.init_calls == 1  # NVML itself works: kept initialized


def test_pynvml_not_installed_is_library_not_found(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    with structlog.testing.capture_logs() as logs:
        collector = GpuCollector(Nvml(), dict)
        scrapes = [samples(collector.collect(())) for _ in range(3)]
    assert scrapes[-1]["llama_speed_gpu_up"] == {(): 0.0}
    assert errors_of(scrapes[-1]) == {"library_not_found": 3}
    assert len(events(logs, "gpu_unavailable")) == 1


def test_real_pynvml_without_a_driver_is_unavailable_not_an_exception() -> None:
    nvml = Nvml()
    s = samples(GpuCollector(nvml, dict).collect(()))
    nvml.close()
    if s["llama_speed_gpu_up"] == {(): 1.0}:
        pytest.skip("this machine has a working NVIDIA driver: test_gpu_real.py covers it")
    assert set(s) == {"llama_speed_gpu_up", "llama_speed_gpu_errors"}
    (reason,) = errors_of(s)
    assert reason in {"library_not_found", "driver_not_loaded", "driver_mismatch", "no_gpu"}


def test_close_shuts_nvml_down_once() -> None:
    fake = FakePynvml()
    nvml = Nvml(fake)
    nvml.read()
    nvml.close()
    nvml.close()
    assert (fake.shutdown_calls, fake.refcount) == (1, 0)


# --- energy around a probe ---


def test_energy_sums_all_gpus_in_joules_and_follows_the_counters() -> None:
    fake = FakePynvml()
    nvml = Nvml(fake)
    before = nvml.energy_joules()
    fake.gpus[0].energy_mj += 150_000
    fake.gpus[1].energy_mj += 120_500
    after = nvml.energy_joules()
    assert before == pytest.approx((1_234_567_890 + 1_098_765_432) / 1000)
    assert after is not None and before is not None
    assert after - before == pytest.approx(270.5)
    # Only the counters are read: a probe's before/after reads stay cheap.
    assert "nvmlDeviceGetComputeRunningProcesses" not in fake.calls


@pytest.mark.parametrize(
    ("function", "error", "gpu"),
    [
        ("nvmlInit", fk.NVMLError_LibraryNotFound, None),
        ("nvmlDeviceGetTotalEnergyConsumption", fk.NVMLError_NotSupported, 1),
        ("*", fk.NVMLError_GpuIsLost, 0),
        ("nvmlDeviceGetCount", fk.NVMLError_DriverNotLoaded, None),
        ("nvmlDeviceGetTotalEnergyConsumption", RuntimeError, None),
    ],
)
def test_energy_is_none_rather_than_partial_or_raised(
    function: str, error: type[Exception], gpu: int | None
) -> None:
    fake = FakePynvml()
    fake.fail(function, error, gpu=gpu)
    assert Nvml(fake).energy_joules() is None


def test_energy_is_none_without_gpus() -> None:
    assert Nvml(FakePynvml(gpus=[])).energy_joules() is None


def test_energy_read_after_driver_loss_reinitializes() -> None:
    fake = FakePynvml()
    nvml = Nvml(fake)
    fake.fail("nvmlDeviceGetCount", fk.NVMLError_Uninitialized, times=1)
    assert nvml.energy_joules() is None
    assert nvml.energy_joules() is not None
    assert fake.init_calls == 2


# --- finding the llama-server process ---


class FakeProc:
    """A /proc tree: net/tcp{,6} tables and per-pid comm, cmdline, environ and fd links."""

    HEADER = (
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid"
        "  timeout inode\n"
    )

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "net").mkdir(parents=True)
        self._rows: dict[str, list[str]] = {"tcp": [], "tcp6": []}
        self._write_tables()

    def _write_tables(self) -> None:
        for table, rows in self._rows.items():
            (self.root / "net" / table).write_text(self.HEADER + "".join(rows))

    def socket(
        self, port: int, inode: int, *, state: str = "0A", table: str = "tcp", addr: str = ""
    ) -> None:
        local = addr or ("0100007F" if table == "tcp" else "0" * 32)
        n = len(self._rows[table])
        self._rows[table].append(
            f"   {n}: {local}:{port:04X} {'0' * len(local)}:0000 {state} 00000000:00000000 "
            f"00:00000000 00000000  1000        0 {inode} 1 0000000000000000 100 0 0 10 0\n"
        )
        self._write_tables()

    def process(
        self,
        pid: int,
        comm: str,
        argv: list[str],
        *,
        environ: dict[str, str] | None = None,
        sockets: Iterable[int] = (),
    ) -> Path:
        d = self.root / str(pid)
        (d / "fd").mkdir(parents=True)
        (d / "comm").write_text(comm + "\n")
        (d / "cmdline").write_bytes(b"".join(a.encode() + b"\0" for a in argv))
        env = environ or {}
        (d / "environ").write_bytes(b"".join(f"{k}={v}".encode() + b"\0" for k, v in env.items()))
        (d / "fd" / "0").symlink_to("/dev/null")
        (d / "fd" / "1").symlink_to("pipe:[5151]")
        for fd, inode in enumerate(sockets, start=3):
            (d / "fd" / str(fd)).symlink_to(f"socket:[{inode}]")
        return d


@pytest.fixture
def proc(tmp_path: Path) -> FakeProc:
    p = FakeProc(tmp_path / "proc")
    p.process(1, "systemd", ["/sbin/init"])
    p.process(1312, "Xorg", ["/usr/lib/xorg/Xorg", ":0"], sockets=[9000])
    p.process(
        fk.LLAMA_PID,
        "llama-server",
        ["/opt/llama.cpp/bin/llama-server", "-m", "/models/q.gguf", "--port", "8080"],
        environ={"CUDA_VISIBLE_DEVICES": "0,1", "LLAMA_ARG_CTX_SIZE": "32768"},
        sockets=[31337],
    )
    # A connection whose local port is 8080 too, held by another process: not a listener.
    p.process(8000, "proxy", ["/usr/bin/proxy"], sockets=[31338])
    p.socket(6000, 9000)  # Xorg
    p.socket(8080, 31338, state="01", addr="0100007F")
    p.socket(8080, 31337, table="tcp6")  # llama-server on [::]:8080
    return p


def test_listening_port_maps_through_the_socket_inode_to_the_pid(proc: FakeProc) -> None:
    found = process.find_listening_pid(8080, proc_root=proc.root)
    assert found == process.ProcessLookup(fk.LLAMA_PID, "port")
    assert process.find_listening_pid(6000, proc_root=proc.root).pid == 1312


def test_ipv4_listener_is_found(proc: FakeProc) -> None:
    proc.process(5555, "llama-server", ["llama-server", "--port", "8081"], sockets=[4444])
    proc.socket(8081, 4444, addr="00000000")
    assert process.find_listening_pid(8081, proc_root=proc.root).pid == 5555


def test_no_listener_on_the_port(proc: FakeProc) -> None:
    found = process.find_listening_pid(9999, proc_root=proc.root)
    assert found == process.ProcessLookup(None, "port", "not_listening")


def test_a_socket_no_visible_process_holds_is_not_visible(proc: FakeProc) -> None:
    # What the exporter sees from another PID namespace sharing the server's network.
    proc.socket(8082, 7777)
    found = process.find_listening_pid(8082, proc_root=proc.root)
    assert found == process.ProcessLookup(None, "port", "not_visible")


def test_a_listener_held_by_parent_and_child_is_ambiguous(proc: FakeProc) -> None:
    proc.process(6001, "launcher", ["launcher"], sockets=[31337])
    found = process.find_listening_pid(8080, proc_root=proc.root)
    assert found == process.ProcessLookup(None, "port", "ambiguous")


def test_missing_net_tables_are_not_listening(tmp_path: Path) -> None:
    found = process.find_listening_pid(8080, proc_root=tmp_path / "nothing")
    assert found.reason == "not_listening"


def test_pid_file(proc: FakeProc, tmp_path: Path) -> None:
    pid_file = tmp_path / "llama.pid"
    pid_file.write_text(f"{fk.LLAMA_PID}\n")
    assert process.read_pid_file(pid_file, proc_root=proc.root) == process.ProcessLookup(
        fk.LLAMA_PID, "pid_file"
    )


@pytest.mark.parametrize(
    ("content", "reason"),
    [(None, "pid_file_unreadable"), ("", "pid_file_invalid"), ("abc", "pid_file_invalid"),
     ("0", "pid_file_invalid"), ("-5", "pid_file_invalid"), ("99999", "stale_pid_file")],
)  # fmt: skip
def test_broken_pid_files(proc: FakeProc, tmp_path: Path, content: str | None, reason: str) -> None:
    pid_file = tmp_path / "llama.pid"
    if content is not None:
        pid_file.write_text(content)
    assert process.read_pid_file(pid_file, proc_root=proc.root).reason == reason


def test_process_name_by_comm_or_argv0(proc: FakeProc) -> None:
    assert process.find_pid_by_name("llama-server", proc_root=proc.root).pid == fk.LLAMA_PID
    # A renamed thread leader (comm) is still found by its argv[0].
    proc.process(7000, "worker", ["/usr/local/bin/my-llama"])
    assert process.find_pid_by_name("my-llama", proc_root=proc.root).pid == 7000
    assert process.find_pid_by_name("nope", proc_root=proc.root).reason == "not_found"


def test_process_name_longer_than_comm(proc: FakeProc) -> None:
    name = "llama-server-cuda-12"
    proc.process(7100, name[:15], [f"./{name}x"])
    assert process.find_pid_by_name(name, proc_root=proc.root).pid == 7100


def test_two_processes_of_the_name_are_ambiguous(proc: FakeProc) -> None:
    proc.process(7200, "llama-server", ["llama-server", "--port", "8090"])
    found = process.find_pid_by_name("llama-server", proc_root=proc.root)
    assert found == process.ProcessLookup(None, "name", "ambiguous")


def test_find_server_pid_prefers_pid_file_then_port_then_name(
    proc: FakeProc, tmp_path: Path
) -> None:
    root = proc.root
    pid_file = tmp_path / "x.pid"
    pid_file.write_text("1312")
    assert process.find_server_pid(pid_file=pid_file, port=8080, proc_root=root).pid == 1312
    assert process.find_server_pid(port=8080, name="Xorg", proc_root=root).method == "port"
    assert process.find_server_pid(port=9999, name="Xorg", proc_root=root) == (
        process.ProcessLookup(1312, "name")
    )
    assert process.find_server_pid(port=9999, name="nope", proc_root=root).reason == (
        "not_listening"
    )
    assert process.find_server_pid(proc_root=root).reason == "not_configured"
    # A configured pid file is authoritative: its failure is not guessed around.
    pid_file.write_text("99999")
    assert process.find_server_pid(pid_file=pid_file, port=8080, proc_root=root).reason == (
        "stale_pid_file"
    )


def test_read_cmdline_and_environ(proc: FakeProc) -> None:
    assert process.read_cmdline(fk.LLAMA_PID, proc_root=proc.root) == (
        "/opt/llama.cpp/bin/llama-server", "-m", "/models/q.gguf", "--port", "8080",
    )  # fmt: skip
    assert process.read_environ(fk.LLAMA_PID, proc_root=proc.root) == {
        "CUDA_VISIBLE_DEVICES": "0,1",
        "LLAMA_ARG_CTX_SIZE": "32768",
    }
    assert process.read_environ(1, proc_root=proc.root) == {}


def test_environ_values_may_hold_equals_signs(proc: FakeProc) -> None:
    d = proc.process(7300, "x", ["x"])
    (d / "environ").write_bytes(b"A=b=c\0NOEQUALS\0=bad\0")
    assert process.read_environ(7300, proc_root=proc.root) == {"A": "b=c"}


def test_kernel_thread_has_an_empty_cmdline(proc: FakeProc) -> None:
    d = proc.process(2, "kthreadd", [])
    assert (d / "cmdline").read_bytes() == b""
    assert process.read_cmdline(2, proc_root=proc.root) == ()


@pytest.mark.parametrize("how", ["gone", "directory", "dangling_link", "no_permission"])
def test_unreadable_environ_is_none_never_an_exception(proc: FakeProc, how: str) -> None:
    d = proc.process(7400, "llama-server", ["llama-server"], environ={"LLAMA_API_KEY": "s3cret"})
    environ = d / "environ"
    if how == "gone":
        assert process.read_environ(99999, proc_root=proc.root) is None
        assert process.read_cmdline(99999, proc_root=proc.root) is None
        return
    environ.unlink()
    if how == "directory":
        environ.mkdir()
    elif how == "dangling_link":
        environ.symlink_to(d / "exited")
    else:
        if os.geteuid() == 0:
            pytest.skip("root reads a mode-000 file: the directory and link cases cover OSError")
        environ.write_bytes(b"LLAMA_API_KEY=s3cret\0")
        environ.chmod(0)
    assert process.read_environ(7400, proc_root=proc.root) is None


def test_real_proc_finds_this_process_listening() -> None:
    if not Path("/proc/net/tcp").exists():
        pytest.skip("no Linux /proc here")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert process.find_listening_pid(port) == process.ProcessLookup(os.getpid(), "port")
    argv = process.read_cmdline(os.getpid())
    assert argv is not None and Path(argv[0]).name.startswith("python")
    env = process.read_environ(os.getpid())
    assert env is not None and "PATH" in env
