"""A fake pynvml over two RTX 3060 12 GB cards, for tests on machines without an NVIDIA GPU.

`FakePynvml()` stands in for the module: the functions the exporter calls, with nvidia-ml-py
13's names, parameters, units and return shapes (strings decoded except the PCI busId, memory in
bytes, power in mW, energy in mJ, process infos whose usedGpuMemory may be None), its NVMLError
classes with NVML's codes, and the constants. Like the real library, every call but nvmlInit
raises NVMLError_Uninitialized until nvmlInit succeeded.

Failures are injected per function, per GPU and for a number of calls:
`fake.fail("nvmlDeviceGetPowerUsage", NVMLError_NotSupported, gpu=1)`, `fake.lose(1)` for a
GPU fallen off the bus, `fake.fail("nvmlInit", NVMLError_LibraryNotFound)` for a machine
without the driver; `fake.heal()` clears them all. test_gpu.py checks the names, codes and
signatures against the real module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_ALREADY_INITIALIZED = 5
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_INSUFFICIENT_SIZE = 7
NVML_ERROR_INSUFFICIENT_POWER = 8
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_TIMEOUT = 10
NVML_ERROR_IRQ_ISSUE = 11
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_CORRUPTED_INFOROM = 14
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_RESET_REQUIRED = 16
NVML_ERROR_OPERATING_SYSTEM = 17
NVML_ERROR_LIB_RM_VERSION_MISMATCH = 18
NVML_ERROR_IN_USE = 19
NVML_ERROR_MEMORY = 20
NVML_ERROR_NO_DATA = 21
NVML_ERROR_VGPU_ECC_NOT_SUPPORTED = 22
NVML_ERROR_INSUFFICIENT_RESOURCES = 23
NVML_ERROR_FREQ_NOT_SUPPORTED = 24
NVML_ERROR_ARGUMENT_VERSION_MISMATCH = 25
NVML_ERROR_DEPRECATED = 26
NVML_ERROR_NOT_READY = 27
NVML_ERROR_GPU_NOT_FOUND = 28
NVML_ERROR_INVALID_STATE = 29
NVML_ERROR_RESET_TYPE_NOT_SUPPORTED = 30
NVML_ERROR_UNKNOWN = 999

NVML_TEMPERATURE_GPU = 0
NVML_CLOCK_GRAPHICS = 0
NVML_CLOCK_SM = 1
NVML_CLOCK_MEM = 2
NVML_CLOCK_VIDEO = 3
NVML_VALUE_NOT_AVAILABLE_UINT = 0xFFFFFFFF  # gpuInstanceId / computeInstanceId outside MIG

_STRINGS = {
    NVML_ERROR_UNINITIALIZED: "Uninitialized",
    NVML_ERROR_INVALID_ARGUMENT: "Invalid Argument",
    NVML_ERROR_NOT_SUPPORTED: "Not Supported",
    NVML_ERROR_NO_PERMISSION: "Insufficient Permissions",
    NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded",
    NVML_ERROR_TIMEOUT: "Timeout",
    NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
    NVML_ERROR_GPU_IS_LOST: "GPU is lost",
    NVML_ERROR_RESET_REQUIRED: "GPU requires restart",
    NVML_ERROR_LIB_RM_VERSION_MISMATCH: "RM has detected an NVML/RM version mismatch.",
    NVML_ERROR_UNKNOWN: "Unknown Error",
}


class NVMLError(Exception):
    """As in pynvml: NVMLError(code) is the subclass for that code; subclasses take no code."""

    _valClassMapping: ClassVar[dict[int, type[NVMLError]]] = {}  # noqa: N815  # pynvml's name
    code: ClassVar[int] = NVML_ERROR_UNKNOWN
    value: int

    def __new__(cls, value: int | None = None) -> NVMLError:
        if cls is NVMLError:
            code = NVML_ERROR_UNKNOWN if value is None else value
            obj = Exception.__new__(NVMLError._valClassMapping.get(code, NVMLError))
            obj.value = code
        else:
            obj = Exception.__new__(cls)
            obj.value = cls.code
        return obj

    def __str__(self) -> str:
        return _STRINGS.get(self.value, f"NVML Error with code {self.value}")


class NVMLLibraryMismatchError(Exception):
    """pynvml raises it (not an NVMLError) for a function the installed driver lacks."""


def _error_class(name: str, code: int) -> type[NVMLError]:
    cls = type(name, (NVMLError,), {"code": code, "__module__": __name__})
    NVMLError._valClassMapping[code] = cls
    return cls


NVMLError_Uninitialized = _error_class("NVMLError_Uninitialized", NVML_ERROR_UNINITIALIZED)
NVMLError_InvalidArgument = _error_class("NVMLError_InvalidArgument", NVML_ERROR_INVALID_ARGUMENT)
NVMLError_NotSupported = _error_class("NVMLError_NotSupported", NVML_ERROR_NOT_SUPPORTED)
NVMLError_NoPermission = _error_class("NVMLError_NoPermission", NVML_ERROR_NO_PERMISSION)
NVMLError_AlreadyInitialized = _error_class(
    "NVMLError_AlreadyInitialized", NVML_ERROR_ALREADY_INITIALIZED
)
NVMLError_NotFound = _error_class("NVMLError_NotFound", NVML_ERROR_NOT_FOUND)
NVMLError_InsufficientSize = _error_class(
    "NVMLError_InsufficientSize", NVML_ERROR_INSUFFICIENT_SIZE
)
NVMLError_InsufficientPower = _error_class(
    "NVMLError_InsufficientPower", NVML_ERROR_INSUFFICIENT_POWER
)
NVMLError_DriverNotLoaded = _error_class("NVMLError_DriverNotLoaded", NVML_ERROR_DRIVER_NOT_LOADED)
NVMLError_Timeout = _error_class("NVMLError_Timeout", NVML_ERROR_TIMEOUT)
NVMLError_IrqIssue = _error_class("NVMLError_IrqIssue", NVML_ERROR_IRQ_ISSUE)
NVMLError_LibraryNotFound = _error_class("NVMLError_LibraryNotFound", NVML_ERROR_LIBRARY_NOT_FOUND)
NVMLError_FunctionNotFound = _error_class(
    "NVMLError_FunctionNotFound", NVML_ERROR_FUNCTION_NOT_FOUND
)
NVMLError_CorruptedInforom = _error_class(
    "NVMLError_CorruptedInforom", NVML_ERROR_CORRUPTED_INFOROM
)
NVMLError_GpuIsLost = _error_class("NVMLError_GpuIsLost", NVML_ERROR_GPU_IS_LOST)
NVMLError_ResetRequired = _error_class("NVMLError_ResetRequired", NVML_ERROR_RESET_REQUIRED)
NVMLError_OperatingSystem = _error_class("NVMLError_OperatingSystem", NVML_ERROR_OPERATING_SYSTEM)
NVMLError_LibRmVersionMismatch = _error_class(
    "NVMLError_LibRmVersionMismatch", NVML_ERROR_LIB_RM_VERSION_MISMATCH
)
NVMLError_InUse = _error_class("NVMLError_InUse", NVML_ERROR_IN_USE)
NVMLError_Memory = _error_class("NVMLError_Memory", NVML_ERROR_MEMORY)
NVMLError_NoData = _error_class("NVMLError_NoData", NVML_ERROR_NO_DATA)
NVMLError_VgpuEccNotSupported = _error_class(
    "NVMLError_VgpuEccNotSupported", NVML_ERROR_VGPU_ECC_NOT_SUPPORTED
)
NVMLError_InsufficientResources = _error_class(
    "NVMLError_InsufficientResources", NVML_ERROR_INSUFFICIENT_RESOURCES
)
NVMLError_FreqNotSupported = _error_class(
    "NVMLError_FreqNotSupported", NVML_ERROR_FREQ_NOT_SUPPORTED
)
NVMLError_ArgumentVersionMismatch = _error_class(
    "NVMLError_ArgumentVersionMismatch", NVML_ERROR_ARGUMENT_VERSION_MISMATCH
)
NVMLError_Deprecated = _error_class("NVMLError_Deprecated", NVML_ERROR_DEPRECATED)
NVMLError_NotReady = _error_class("NVMLError_NotReady", NVML_ERROR_NOT_READY)
NVMLError_GpuNotFound = _error_class("NVMLError_GpuNotFound", NVML_ERROR_GPU_NOT_FOUND)
NVMLError_InvalidState = _error_class("NVMLError_InvalidState", NVML_ERROR_INVALID_STATE)
NVMLError_ResetTypeNotSupported = _error_class(
    "NVMLError_ResetTypeNotSupported", NVML_ERROR_RESET_TYPE_NOT_SUPPORTED
)
NVMLError_Unknown = _error_class("NVMLError_Unknown", NVML_ERROR_UNKNOWN)

ERROR_CLASSES: dict[str, type[NVMLError]] = {
    name: value
    for name, value in globals().items()
    if name.startswith("NVMLError_") and isinstance(value, type)
}
CONSTANTS: dict[str, int] = {
    name: value
    for name, value in globals().items()
    if name.startswith("NVML_")
    and isinstance(value, int)
    and name != "NVML_VALUE_NOT_AVAILABLE_UINT"
}

GIB = 1024**3
MIB = 1024**2
RTX_3060_MEMORY = 12 * GIB  # 12,884,901,888 bytes
# The owner's llama-server: a model split over both cards.
LLAMA_PID = 4242
LLAMA_GPU0_BYTES = 8960 * MIB  # ~9.4 GB
LLAMA_GPU1_BYTES = 8400 * MIB  # ~8.8 GB
XORG_PID = 1312
XORG_BYTES = 4 * MIB
DRIVER_RESERVED = 280 * MIB  # what nvidia-smi shows used on an idle 3060
DRIVER_VERSION = "580.95.05"


@dataclass
class FakeProcess:
    pid: int
    usedGpuMemory: int | None  # noqa: N815  # pynvml's field name
    gpuInstanceId: int = NVML_VALUE_NOT_AVAILABLE_UINT  # noqa: N815
    computeInstanceId: int = NVML_VALUE_NOT_AVAILABLE_UINT  # noqa: N815


@dataclass
class FakeGpu:
    uuid: str
    pci_bus_id: str
    memory_used: int
    utilization_percent: int
    power_mw: int
    energy_mj: int
    temperature_c: int
    compute_processes: list[FakeProcess] = field(default_factory=list)
    graphics_processes: list[FakeProcess] = field(default_factory=list)
    name: str = "NVIDIA GeForce RTX 3060"
    memory_total: int = RTX_3060_MEMORY
    memory_bus_width_bits: int = 192
    # nvidia-smi -q's "Max Clocks" of a 3060 12 GB: 15 Gbps GDDR6 reported as 7501 MHz.
    max_clocks_mhz: dict[int, int] = field(
        default_factory=lambda: {
            NVML_CLOCK_GRAPHICS: 2100,
            NVML_CLOCK_SM: 2100,
            NVML_CLOCK_MEM: 7501,
            NVML_CLOCK_VIDEO: 1950,
        }
    )


def two_rtx_3060() -> list[FakeGpu]:
    return [
        FakeGpu(
            uuid="GPU-5b7f0c3e-2d41-8a9e-6f12-3c4d5e6f7a80",
            pci_bus_id="00000000:01:00.0",
            memory_used=LLAMA_GPU0_BYTES + XORG_BYTES + DRIVER_RESERVED,
            utilization_percent=87,
            power_mw=112_345,
            energy_mj=1_234_567_890,
            temperature_c=61,
            compute_processes=[FakeProcess(LLAMA_PID, LLAMA_GPU0_BYTES)],
            graphics_processes=[FakeProcess(XORG_PID, XORG_BYTES)],
        ),
        FakeGpu(
            uuid="GPU-a1b2c3d4-e5f6-4789-9abc-def012345678",
            pci_bus_id="00000000:02:00.0",
            memory_used=LLAMA_GPU1_BYTES + DRIVER_RESERVED,
            utilization_percent=83,
            power_mw=98_765,
            energy_mj=1_098_765_432,
            temperature_c=57,
            compute_processes=[FakeProcess(LLAMA_PID, LLAMA_GPU1_BYTES)],
        ),
    ]


@dataclass(frozen=True)
class Handle:
    """Stands for pynvml's opaque c_nvmlDevice_t."""

    index: int


@dataclass
class MemoryInfo:  # c_nvmlMemory_t
    total: int
    free: int
    used: int


@dataclass
class Utilization:  # c_nvmlUtilization_t, in percent
    gpu: int
    memory: int


@dataclass
class PciInfo:  # nvmlPciInfo_t: the busId char arrays stay bytes
    busIdLegacy: bytes  # noqa: N815
    domain: int
    bus: int
    device: int
    pciDeviceId: int  # noqa: N815
    pciSubSystemId: int  # noqa: N815
    busId: bytes  # noqa: N815


@dataclass
class _Failure:
    function: str  # "*" for every call
    error: type[Exception]
    gpu: int | None  # None: whatever the device
    times: int | None  # None: until healed


class FakePynvml:
    """The pynvml module as the exporter uses it, over `gpus` (two RTX 3060 by default)."""

    NVMLError = NVMLError
    NVMLLibraryMismatchError = NVMLLibraryMismatchError

    def __init__(self, gpus: list[FakeGpu] | None = None) -> None:
        self.gpus = two_rtx_3060() if gpus is None else gpus
        self.driver_version = DRIVER_VERSION
        self.init_calls = 0
        self.shutdown_calls = 0
        self.refcount = 0
        self.calls: list[str] = []
        self._failures: list[_Failure] = []
        for name, cls in ERROR_CLASSES.items():
            setattr(self, name, cls)
        for name, value in CONSTANTS.items():
            setattr(self, name, value)

    def __getattr__(self, name: str) -> Any:
        # Only reached for names the fake lacks: fail loudly, never return a silent default.
        raise AttributeError(f"fake pynvml has no {name!r}")

    # --- failure injection ---

    def fail(
        self,
        function: str,
        error: type[Exception],
        *,
        gpu: int | None = None,
        times: int | None = None,
    ) -> None:
        """Make `function` ("*": every function) raise `error`, on `gpu` only if given."""
        self._failures.append(_Failure(function, error, gpu, times))

    def lose(self, gpu: int) -> None:
        """The GPU fell off the bus: every call about it raises NVMLError_GpuIsLost."""
        self.fail("*", NVMLError_GpuIsLost, gpu=gpu)

    def heal(self) -> None:
        self._failures.clear()

    def _check(self, function: str, gpu: int | None = None) -> None:
        self.calls.append(function)
        for failure in self._failures:
            if failure.function not in ("*", function):
                continue
            if failure.gpu is not None and failure.gpu != gpu:
                continue
            if failure.times is not None:
                if failure.times == 0:
                    continue
                failure.times -= 1
            raise failure.error()
        if function != "nvmlInit" and self.refcount == 0:
            raise NVMLError_Uninitialized()

    def _gpu(self, function: str, handle: Handle) -> FakeGpu:
        self._check(function, handle.index)
        return self.gpus[handle.index]

    # --- the pynvml functions ---

    def nvmlInit(self) -> None:  # noqa: N802  # pynvml's names throughout
        self.init_calls += 1
        self._check("nvmlInit")
        self.refcount += 1

    def nvmlShutdown(self) -> None:  # noqa: N802
        self.shutdown_calls += 1
        self._check("nvmlShutdown")
        self.refcount -= 1

    def nvmlSystemGetDriverVersion(self) -> str:  # noqa: N802
        self._check("nvmlSystemGetDriverVersion")
        return self.driver_version

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        self._check("nvmlDeviceGetCount")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Handle:  # noqa: N802
        self._check("nvmlDeviceGetHandleByIndex", index)
        if not 0 <= index < len(self.gpus):
            raise NVMLError_InvalidArgument()
        return Handle(index)

    def nvmlDeviceGetUUID(self, handle: Handle) -> str:  # noqa: N802
        return self._gpu("nvmlDeviceGetUUID", handle).uuid

    def nvmlDeviceGetName(self, handle: Handle) -> str:  # noqa: N802
        return self._gpu("nvmlDeviceGetName", handle).name

    def nvmlDeviceGetPciInfo(self, handle: Handle) -> PciInfo:  # noqa: N802
        g = self._gpu("nvmlDeviceGetPciInfo", handle)
        domain, bus, rest = g.pci_bus_id.split(":")
        device = rest.split(".")[0]
        return PciInfo(
            busIdLegacy=f"{int(domain, 16):04X}:{bus}:{rest}".encode(),
            domain=int(domain, 16),
            bus=int(bus, 16),
            device=int(device, 16),
            pciDeviceId=0x250310DE,
            pciSubSystemId=0x397D1462,
            busId=g.pci_bus_id.encode(),
        )

    def nvmlDeviceGetMemoryInfo(self, handle: Handle, version: int | None = None) -> MemoryInfo:  # noqa: N802
        g = self._gpu("nvmlDeviceGetMemoryInfo", handle)
        return MemoryInfo(
            total=g.memory_total, free=g.memory_total - g.memory_used, used=g.memory_used
        )

    def nvmlDeviceGetUtilizationRates(self, handle: Handle) -> Utilization:  # noqa: N802
        g = self._gpu("nvmlDeviceGetUtilizationRates", handle)
        return Utilization(gpu=g.utilization_percent, memory=g.utilization_percent // 2)

    def nvmlDeviceGetPowerUsage(self, handle: Handle) -> int:  # noqa: N802
        return self._gpu("nvmlDeviceGetPowerUsage", handle).power_mw

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: Handle) -> int:  # noqa: N802
        return self._gpu("nvmlDeviceGetTotalEnergyConsumption", handle).energy_mj

    def nvmlDeviceGetTemperature(self, handle: Handle, sensor: int) -> int:  # noqa: N802
        g = self._gpu("nvmlDeviceGetTemperature", handle)
        if sensor != NVML_TEMPERATURE_GPU:
            raise NVMLError_InvalidArgument()
        return g.temperature_c

    def nvmlDeviceGetMemoryBusWidth(self, device: Handle) -> int:  # noqa: N802
        return self._gpu("nvmlDeviceGetMemoryBusWidth", device).memory_bus_width_bits

    def nvmlDeviceGetMaxClockInfo(self, handle: Handle, type: int) -> int:  # noqa: N802
        g = self._gpu("nvmlDeviceGetMaxClockInfo", handle)
        if type not in g.max_clocks_mhz:
            raise NVMLError_InvalidArgument()
        return g.max_clocks_mhz[type]

    def nvmlDeviceGetComputeRunningProcesses(self, handle: Handle) -> list[FakeProcess]:  # noqa: N802
        return list(self._gpu("nvmlDeviceGetComputeRunningProcesses", handle).compute_processes)

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: Handle) -> list[FakeProcess]:  # noqa: N802
        return list(self._gpu("nvmlDeviceGetGraphicsRunningProcesses", handle).graphics_processes)


PYNVML_FUNCTIONS = tuple(name for name in vars(FakePynvml) if name.startswith("nvml"))
