"""NVML behind one narrow interface: the only module that imports `pynvml`.

`Nvml.read()` returns plain dataclasses in base units (bytes, watts, joules, a 0-1 ratio), or
raises `GpuUnavailable(reason)` when NVML as a whole cannot answer. Failures are contained at
the smallest scope that explains them:

- a value NVML does not support on this device (NOT_SUPPORTED) is None, silently: consumer cards
  and unified-memory devices lack several of them, and that is not an error;
- any other failed call drops only its own value (None) and records a `GpuError`;
- a GPU that fell off the bus (GPU_IS_LOST, UNKNOWN, RESET_REQUIRED) drops that GPU's sample;
- a missing library or driver, or a driver and library of different versions, fails the whole
  read; the next read initializes NVML again, at most once per `retry_interval_s` while it keeps
  failing, so the exporter recovers on its own when the driver comes back.

pynvml is imported lazily, so the exporter imports and serves its other metrics without it.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Literal, NamedTuple, get_args

import structlog

log = structlog.get_logger(__name__)

Reason = Literal[
    "library_not_found",  # no libnvidia-ml.so (no driver installed, or not mounted) or no pynvml
    "driver_not_loaded",  # the kernel module is not loaded
    "driver_mismatch",  # library and kernel module of different versions (upgrade, no reboot)
    "no_permission",  # NVML refused the call (device nodes or process list not permitted)
    "no_gpu",  # NVML works but sees no GPU
    "gpu_lost",  # the GPU fell off the bus or needs a reset
    "error",  # anything else NVML reported
]
REASONS: Final[tuple[Reason, ...]] = get_args(Reason)

# NVML return codes from nvml.h. They are ABI, so classifying by code works for any module that
# raises NVMLError with a `.value`, including the test fake.
_UNINITIALIZED: Final = 1
_NOT_SUPPORTED: Final = 3
_NO_PERMISSION: Final = 4
_DRIVER_NOT_LOADED: Final = 9
_LIBRARY_NOT_FOUND: Final = 12
_GPU_IS_LOST: Final = 15
_RESET_REQUIRED: Final = 16
_LIB_RM_VERSION_MISMATCH: Final = 18
_GPU_NOT_FOUND: Final = 28
_UNKNOWN: Final = 999

# Codes that mean NVML itself is gone: no later call can succeed until it is initialized again.
_DRIVER_REASONS: Final[dict[int, Reason]] = {
    _UNINITIALIZED: "error",
    _DRIVER_NOT_LOADED: "driver_not_loaded",
    _LIBRARY_NOT_FOUND: "library_not_found",
    _LIB_RM_VERSION_MISMATCH: "driver_mismatch",
}
_INIT_REASONS: Final[dict[int, Reason]] = {
    **_DRIVER_REASONS,
    _NO_PERMISSION: "no_permission",
    _GPU_NOT_FOUND: "no_gpu",
}
# NVML documents UNKNOWN as what a call returns once a GPU has stopped answering.
_DEVICE_LOST_CODES: Final = frozenset({_GPU_IS_LOST, _RESET_REQUIRED, _UNKNOWN})

DEFAULT_RETRY_INTERVAL_S: Final = 10.0
# What pynvml loads on Linux: the driver's NVML library.
_NVML_LIBRARY: Final = "libnvidia-ml.so.1"

_Scope = Literal["field", "device", "driver"]


class GpuUnavailable(Exception):  # noqa: N818  # a state the caller reports, not a bug
    """NVML cannot answer at all; `reason` is one of `REASONS`."""

    def __init__(self, reason: Reason, detail: str = "") -> None:
        self.reason: Reason = reason
        self.detail = detail
        super().__init__(f"NVML unavailable: {reason}" + (f" ({detail})" if detail else ""))


class GpuProcess(NamedTuple):
    pid: int  # as NVML sees it: the host's pid namespace
    used_bytes: int | None  # None where NVML cannot attribute memory (WDDM, MIG without rights)


@dataclass(frozen=True)
class GpuSample:
    index: int  # NVML's index (PCI order), not CUDA's default order: join on uuid
    uuid: str
    name: str
    pci_bus_id: str  # "" if NVML could not say
    # None on devices without dedicated memory reporting (unified-memory systems).
    memory_used_bytes: int | None
    memory_total_bytes: int | None
    utilization_ratio: float | None
    power_watts: float | None
    energy_joules: float | None  # since the driver was loaded
    temperature_celsius: int | None
    memory_bus_width_bits: int | None
    max_memory_clock_mhz: int | None
    # One entry per pid, compute and graphics contexts merged; None if NVML could not list them.
    processes: tuple[GpuProcess, ...] | None


@dataclass(frozen=True)
class GpuError:
    reason: Reason
    gpu: int | None  # None for system-wide values (the driver version)
    field: str | None  # None when the whole GPU's sample was dropped
    detail: str = ""  # NVML's words, for the log


@dataclass(frozen=True)
class GpuReading:
    driver_version: str | None
    gpus: tuple[GpuSample, ...]
    errors: tuple[GpuError, ...]


class _DeviceDroppedError(Exception):
    def __init__(self, reason: Reason, detail: str) -> None:
        self.reason: Reason = reason
        super().__init__(detail)


def _library_missing() -> str | None:
    """Why the driver's NVML library cannot be loaded here, or None when it can."""
    try:
        ctypes.CDLL(_NVML_LIBRARY)
    except OSError as exc:
        return f"{_NVML_LIBRARY}: {exc}"
    return None


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _text(value: Any) -> str:
    # pynvml decodes most strings, but ctypes char arrays in structs (PCI busId) stay bytes.
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return str(value)


def _classify(nv: Any, exc: Exception) -> tuple[_Scope, Reason | None]:
    """Where a failed call's damage stops, and the reason to record (None: record nothing)."""
    if not isinstance(exc, nv.NVMLError):
        # e.g. pynvml's NVMLLibraryMismatchError for a function this driver lacks.
        return "field", "error"
    code = getattr(exc, "value", None)
    if code == _NOT_SUPPORTED:
        return "field", None
    if code in _DRIVER_REASONS:
        return "driver", _DRIVER_REASONS[code]
    if code in _DEVICE_LOST_CODES:
        return "device", "gpu_lost"
    if code == _NO_PERMISSION:
        return "field", "no_permission"
    return "field", "error"


def _init_reason(nv: Any, exc: Exception) -> Reason:
    code = getattr(exc, "value", None) if isinstance(exc, nv.NVMLError) else None
    return _INIT_REASONS.get(code, "error") if isinstance(code, int) else "error"


class _DeviceReader:
    """The calls for one GPU, each failure contained at the scope `_classify` gives it."""

    def __init__(self, nv: Any, index: int, errors: list[GpuError]) -> None:
        self._nv = nv
        self._index = index
        self._errors = errors
        self.handle: Any = self.required("handle", nv.nvmlDeviceGetHandleByIndex, index)

    def _unless_driver_gone(self, exc: Exception) -> tuple[_Scope, Reason | None]:
        """Raise when NVML as a whole is gone; else how far the failure reaches, and why."""
        scope, reason = _classify(self._nv, exc)
        if scope == "driver" and reason is not None:
            raise GpuUnavailable(reason, _describe(exc)) from None
        return scope, reason

    def call(self, name: str, fn: Callable[..., Any], *args: Any) -> Any | None:
        try:
            return fn(*args)
        except Exception as exc:
            scope, reason = self._unless_driver_gone(exc)
            if scope == "device" and reason is not None:
                raise _DeviceDroppedError(reason, _describe(exc)) from None
            if reason is not None:
                self._errors.append(GpuError(reason, self._index, name, _describe(exc)))
            return None

    def required(self, name: str, fn: Callable[..., Any], *args: Any) -> Any:
        """A value the sample cannot do without (its identity): failing it drops the GPU."""
        try:
            return fn(*args)
        except Exception as exc:
            _, reason = self._unless_driver_gone(exc)
            raise _DeviceDroppedError(reason or "error", f"{name}: {_describe(exc)}") from None


def _read_device(nv: Any, index: int, errors: list[GpuError]) -> GpuSample:
    r = _DeviceReader(nv, index, errors)
    h = r.handle
    uuid = _text(r.required("uuid", nv.nvmlDeviceGetUUID, h))
    name = r.call("name", nv.nvmlDeviceGetName, h)
    pci = r.call("pci_bus_id", nv.nvmlDeviceGetPciInfo, h)
    memory = r.call("memory", nv.nvmlDeviceGetMemoryInfo, h)
    util = r.call("utilization", nv.nvmlDeviceGetUtilizationRates, h)
    power_mw = r.call("power", nv.nvmlDeviceGetPowerUsage, h)
    energy_mj = r.call("energy", nv.nvmlDeviceGetTotalEnergyConsumption, h)
    temperature = r.call("temperature", nv.nvmlDeviceGetTemperature, h, nv.NVML_TEMPERATURE_GPU)
    bus_width = r.call("memory_bus_width", nv.nvmlDeviceGetMemoryBusWidth, h)
    mem_clock = r.call("max_memory_clock", nv.nvmlDeviceGetMaxClockInfo, h, nv.NVML_CLOCK_MEM)
    compute = r.call("compute_processes", nv.nvmlDeviceGetComputeRunningProcesses, h)
    graphics = r.call("graphics_processes", nv.nvmlDeviceGetGraphicsRunningProcesses, h)
    return GpuSample(
        index=index,
        uuid=uuid,
        name=_text(name) if name is not None else "",
        pci_bus_id=_text(pci.busId) if pci is not None else "",
        memory_used_bytes=int(memory.used) if memory is not None else None,
        memory_total_bytes=int(memory.total) if memory is not None else None,
        utilization_ratio=int(util.gpu) / 100 if util is not None else None,
        power_watts=int(power_mw) / 1000 if power_mw is not None else None,
        energy_joules=int(energy_mj) / 1000 if energy_mj is not None else None,
        temperature_celsius=int(temperature) if temperature is not None else None,
        memory_bus_width_bits=int(bus_width) if bus_width is not None else None,
        max_memory_clock_mhz=int(mem_clock) if mem_clock is not None else None,
        processes=_merge_processes(compute, graphics),
    )


def _merge_processes(*lists: list[Any] | None) -> tuple[GpuProcess, ...] | None:
    # A process with both a CUDA and a graphics context is listed twice with the same memory;
    # adding the two would double-count it.
    if all(infos is None for infos in lists):
        return None
    by_pid: dict[int, int | None] = {}
    for infos in lists:
        for info in infos or ():
            pid = int(info.pid)
            used = int(info.usedGpuMemory) if info.usedGpuMemory is not None else None
            known = by_pid.get(pid)
            if pid not in by_pid or (used is not None and (known is None or used > known)):
                by_pid[pid] = used
    return tuple(GpuProcess(pid, used) for pid, used in sorted(by_pid.items()))


class Nvml:
    """NVML, initialized once and re-initialized after it fails; safe to share between threads.

    `module` is the pynvml module, or a fake with the same names; by default the real one is
    imported on first use. `clock` paces retries after a failed initialization.
    """

    def __init__(
        self,
        module: Any = None,
        *,
        retry_interval_s: float = DEFAULT_RETRY_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._module = module
        self._retry_interval_s = retry_interval_s
        self._clock = clock
        # One read at a time: scrapes and the probe's energy reads share the init state.
        self._lock = threading.Lock()
        self._nv: Any = None  # the module, once nvmlInit succeeded
        self._init_failure: GpuUnavailable | None = None
        self._retry_at = 0.0
        self._available: bool | None = None  # None until the first read: logs transitions only
        self._unavailable_reason: Reason | None = None
        self._failing: set[tuple[int | None, str | None, Reason]] = set()

    def read(self) -> GpuReading:
        """Every GPU's sample; raises GpuUnavailable when NVML cannot answer at all."""
        with self._lock:
            try:
                reading = self._read_locked()
            except GpuUnavailable as exc:
                self._note_unavailable(exc)
                raise
            self._note_reading(reading)
            return reading

    def energy_joules(self) -> float | None:
        """Energy counters summed over all GPUs, in joules; None rather than an exception.

        Meant to be read before and after a probe. None unless every GPU reported, so that a GPU
        missing from one of the two reads cannot pass for energy spent. The counters restart
        when the driver reloads: a caller should discard a negative difference.
        """
        with self._lock:
            try:
                nv = self._ensure_initialized()
            except GpuUnavailable:
                return None
            try:
                count = int(nv.nvmlDeviceGetCount())
                total_mj = sum(
                    int(nv.nvmlDeviceGetTotalEnergyConsumption(nv.nvmlDeviceGetHandleByIndex(i)))
                    for i in range(count)
                )
            except Exception as exc:
                scope, reason = _classify(nv, exc)
                if scope == "driver" and reason is not None:
                    self._forget_init(nv)
                return None
            return total_mj / 1000 if count else None

    def close(self) -> None:
        """Shut NVML down if this object initialized it."""
        with self._lock:
            if self._nv is not None:
                self._forget_init(self._nv)

    def _read_locked(self) -> GpuReading:
        nv = self._ensure_initialized()
        try:
            return self._read_all(nv)
        except GpuUnavailable as exc:
            if exc.reason != "no_gpu":
                self._forget_init(nv)
            raise

    def _read_all(self, nv: Any) -> GpuReading:
        errors: list[GpuError] = []
        try:
            count = int(nv.nvmlDeviceGetCount())
        except Exception as exc:
            scope, reason = _classify(nv, exc)
            raise GpuUnavailable(
                reason if scope == "driver" and reason is not None else "error", _describe(exc)
            ) from None
        if count == 0:
            raise GpuUnavailable("no_gpu", "NVML lists no GPU")
        try:
            driver_version: str | None = _text(nv.nvmlSystemGetDriverVersion())
        except Exception as exc:
            scope, reason = _classify(nv, exc)
            if scope == "driver" and reason is not None:
                raise GpuUnavailable(reason, _describe(exc)) from None
            driver_version = None
            errors.append(GpuError(reason or "error", None, "driver_version", _describe(exc)))
        gpus: list[GpuSample] = []
        for index in range(count):
            try:
                gpus.append(_read_device(nv, index, errors))
            except _DeviceDroppedError as exc:
                errors.append(GpuError(exc.reason, index, None, str(exc)))
        return GpuReading(driver_version, tuple(gpus), tuple(errors))

    def _ensure_initialized(self) -> Any:
        if self._nv is not None:
            return self._nv
        now = self._clock()
        if self._init_failure is not None and now < self._retry_at:
            # A failing nvmlInit can take long (driver probing); once per interval is enough.
            raise GpuUnavailable(self._init_failure.reason, self._init_failure.detail)
        nv = self._module
        try:
            if nv is None:
                missing = _library_missing()
                if missing is not None:
                    # pynvml is some 2 MiB of ctypes declarations that cannot work without the
                    # library: a host without a driver never loads it.
                    raise self._init_failed(now, GpuUnavailable("library_not_found", missing))
                import pynvml  # noqa: PLC0415  # lazily: the exporter runs without it

                nv = pynvml
        except ImportError as exc:
            raise self._init_failed(
                now, GpuUnavailable("library_not_found", f"pynvml: {exc}")
            ) from None
        try:
            nv.nvmlInit()
        except Exception as exc:
            failure = GpuUnavailable(_init_reason(nv, exc), _describe(exc))
            raise self._init_failed(now, failure) from None
        self._nv = nv
        self._init_failure = None
        return nv

    def _init_failed(self, now: float, exc: GpuUnavailable) -> GpuUnavailable:
        self._init_failure = exc
        self._retry_at = now + self._retry_interval_s
        return exc

    def _forget_init(self, nv: Any) -> None:
        # The next read initializes again, straight away: NVML worked a moment ago.
        self._nv = None
        with contextlib.suppress(Exception):  # the driver may be gone; only the refcount is lost
            nv.nvmlShutdown()

    def _note_unavailable(self, exc: GpuUnavailable) -> None:
        if self._available is not False or self._unavailable_reason != exc.reason:
            log.warning("gpu_unavailable", reason=exc.reason, error=exc.detail)
        self._available = False
        self._unavailable_reason = exc.reason

    def _note_reading(self, reading: GpuReading) -> None:
        if self._available is not True:
            log.info(
                "gpu_available",
                gpus=len(reading.gpus),
                driver_version=reading.driver_version,
            )
        self._available = True
        self._unavailable_reason = None
        # Each failure is logged as it starts and as it ends, not on every read in between.
        current = {(e.gpu, e.field, e.reason): e.detail for e in reading.errors}
        for (gpu, name, reason), detail in current.items():
            if (gpu, name, reason) not in self._failing:
                event = "gpu_dropped" if name is None else "gpu_value_failed"
                log.warning(event, gpu=gpu, field=name, reason=reason, error=detail)
        for gpu, name, reason in self._failing - current.keys():
            log.info("gpu_recovered", gpu=gpu, field=name, reason=reason)
        self._failing = set(current)
