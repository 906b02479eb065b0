"""Memory per device, now, and whether the machine has an accelerator.

What `from_pretrained(device_map="auto")` makes of these figures (its budget) is
`predict/budget.py`'s business; this module only measures.

Nothing here creates a CUDA context or allocates on a device: a context costs hundreds of MiB on
every GPU it touches, which is the memory the user is trying to get back. So CUDA is measured
only when the process has already initialised it, and `mem_get_info` (which creates a context
on the device it asks about) only on devices where PyTorch already holds memory. torch is never
imported here: a process without it has no tensors to measure.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

from llm_magic.engine.tensors import loaded_torch

CUDA_MEASURED = "initialised"
CUDA_NOT_INITIALISED = "not initialised (not queried, to avoid creating a context)"
CUDA_NO_TORCH = "no torch"
CUDA_UNAVAILABLE = "unavailable"

NO_CONTEXT_NOTE = "no memory of this process here: free memory not queried (that would create a CUDA context)"


@dataclass(frozen=True)
class GpuProcess:
    """A process with a compute context on a GPU, as NVML reports it."""

    pid: int  # inside a container this is the host's pid
    used_bytes: int | None  # None when the driver does not say (MIG, Windows WDDM, permissions)
    this_process: bool | None  # None when our own pid is not in the list (another pid namespace)

    def to_dict(self) -> dict:
        return {"pid": self.pid, "used_bytes": self.used_bytes, "this_process": self.this_process}


@dataclass(frozen=True)
class DeviceMemory:
    """One device. Bytes are ints; None means unknown. CUDA-only and CPU-only fields are None on the other."""

    device: str  # "cuda:0", ..., or "cpu"
    name: str | None
    total_bytes: int | None
    free_bytes: int | None  # cuda: driver free (mem_get_info, all processes); cpu: psutil available
    allocated_bytes: int | None = None  # cuda: live tensors of this process
    reserved_bytes: int | None = None  # cuda: held by PyTorch's caching allocator (allocated + cache)
    other_bytes: int | None = None  # cuda: (total - free) - reserved: other processes + our context
    rss_bytes: int | None = None  # cpu: this process's resident memory
    uuid: str | None = None  # cuda: what NVML knows the device by
    integrated: bool | None = None  # cuda: shares host RAM (then accelerate gives no separate cpu budget)
    processes: tuple[GpuProcess, ...] | None = None  # cuda: from NVML; None when unknown
    note: str | None = None  # why figures are missing

    @property
    def reserved_unused_bytes(self) -> int | None:
        """Cached by PyTorch but holding no tensor: reusable by this process, not by others."""
        if self.reserved_bytes is None or self.allocated_bytes is None:
            return None
        return self.reserved_bytes - self.allocated_bytes

    def to_dict(self) -> dict:
        return {
            "device": self.device,
            "name": self.name,
            "total_bytes": self.total_bytes,
            "free_bytes": self.free_bytes,
            "allocated_bytes": self.allocated_bytes,
            "reserved_bytes": self.reserved_bytes,
            "reserved_unused_bytes": self.reserved_unused_bytes,
            "other_bytes": self.other_bytes,
            "rss_bytes": self.rss_bytes,
            "uuid": self.uuid,
            "integrated": self.integrated,
            "processes": None if self.processes is None else [p.to_dict() for p in self.processes],
            "note": self.note,
        }


@dataclass(frozen=True)
class MemorySnapshot:
    devices: tuple[DeviceMemory, ...]  # measured CUDA devices by ordinal, then "cpu"
    cuda_state: str  # one of the CUDA_* constants
    cuda_device_count: int | None  # devices a load would use (CUDA_VISIBLE_DEVICES applied); None: no torch
    nvml_state: str  # "ok", "not queried", "not installed", or "unavailable (<why>)"
    accelerator_present: bool = False  # the machine has an accelerator PyTorch can use (`accelerator_present`)

    def device(self, name: str) -> DeviceMemory | None:
        for device in self.devices:
            if device.device == name:
                return device
        return None

    def usable_free(self, name: str) -> tuple[int | None, str | None]:
        """(bytes a new allocation on `name` can get now, None) or (None, why it is unknown).

        cpu: available RAM. A GPU: driver free plus PyTorch's cached-but-unused blocks, which
        the allocator hands out before asking the driver.
        """
        row = self.device(name)
        if row is None:
            return None, f"CUDA {self.cuda_state}" if name.startswith("cuda") else "not in the memory snapshot"
        if row.free_bytes is None:
            return None, row.note or "not measured"
        return row.free_bytes + (row.reserved_unused_bytes or 0), None

    @property
    def cuda_devices(self) -> tuple[DeviceMemory, ...]:
        return tuple(device for device in self.devices if device.device.startswith("cuda:"))

    def to_dict(self) -> dict:
        return {
            "devices": [device.to_dict() for device in self.devices],
            "cuda_state": self.cuda_state,
            "cuda_device_count": self.cuda_device_count,
            "nvml_state": self.nvml_state,
            "accelerator_present": self.accelerator_present,
        }


def memory_snapshot() -> MemorySnapshot:
    """Memory of every device this process can see, without touching what is not yet in use."""
    torch = loaded_torch()
    cuda_state, count, gpus = _cuda_memory(torch)
    nvml_state = "not queried"
    if gpus:
        gpus, nvml_state = _with_gpu_processes(gpus)
    return MemorySnapshot((*gpus, _cpu_memory()), cuda_state, count, nvml_state, accelerator_present(torch))


def accelerator_present(torch: Any = None) -> bool:
    """Does this machine have an accelerator PyTorch can use (CUDA, XPU, MPS)?

    The one machine-level answer behind "a model on cpu next to an idle GPU is on a slower
    tier": the load report's warning and its highlighted rows, and watch mode, all ask this.
    Asked without creating a context (`is_available` asks the driver). `torch`: the module,
    when the caller has it; else the loaded one (no torch loaded: no tensors, False).
    """
    torch = loaded_torch() if torch is None else torch
    if torch is None:
        return False
    return _any_backend(
        lambda: torch.cuda.is_available(),
        lambda: torch.xpu.is_available(),
        lambda: torch.backends.mps.is_available(),
    )


def accelerator_in_use(torch: Any) -> bool:
    """Can an accelerator hold memory of this process already? Asked without initialising anything."""
    return _any_backend(
        lambda: torch.cuda.is_initialized(),
        lambda: torch.xpu.is_initialized(),
        lambda: torch.backends.mps.is_available(),
    )


def _any_backend(*checks) -> bool:
    for check in checks:
        try:
            if check():
                return True
        except Exception:  # a backend this build lacks
            continue
    return False


def _cuda_memory(torch: Any) -> tuple[str, int | None, tuple[DeviceMemory, ...]]:
    if torch is None:
        return CUDA_NO_TORCH, None, ()
    try:
        # Before CUDA is initialised torch answers this through NVML: no context, fork-safe.
        count = torch.cuda.device_count()
    except Exception:
        return CUDA_UNAVAILABLE, None, ()
    if count == 0:
        return CUDA_UNAVAILABLE, 0, ()
    if not torch.cuda.is_initialized():
        return CUDA_NOT_INITIALISED, count, ()
    return CUDA_MEASURED, count, tuple(_cuda_device(torch, index) for index in range(count))


def _cuda_device(torch: Any, index: int) -> DeviceMemory:
    device = f"cuda:{index}"
    try:
        # Device properties and allocator statistics need no context on the device.
        properties = torch.cuda.get_device_properties(index)
        allocated = torch.cuda.memory_allocated(index)
        reserved = torch.cuda.memory_reserved(index)
    except Exception as error:
        return DeviceMemory(device, None, None, None, note=f"not readable ({error})")
    known = dict(
        name=properties.name,
        total_bytes=properties.total_memory,
        allocated_bytes=allocated,
        reserved_bytes=reserved,
        uuid=str(properties.uuid),
        integrated=bool(getattr(properties, "is_integrated", False)),
    )
    if reserved == 0:
        # Nothing of ours here, so maybe no context yet: mem_get_info would create one.
        return DeviceMemory(device, free_bytes=None, note=NO_CONTEXT_NOTE, **known)
    try:
        free, total = torch.cuda.mem_get_info(index)
    except Exception as error:
        return DeviceMemory(device, free_bytes=None, note=f"free memory not readable ({error})", **known)
    known["total_bytes"] = total
    return DeviceMemory(device, free_bytes=free, other_bytes=(total - free) - reserved, **known)


def _cpu_memory() -> DeviceMemory:
    try:
        import psutil

        memory = psutil.virtual_memory()
    except Exception as error:
        return DeviceMemory("cpu", "RAM", None, None, note=f"psutil not usable ({error})")
    try:
        rss = psutil.Process().memory_info().rss
    except Exception:
        rss = None
    return DeviceMemory("cpu", "RAM", memory.total, memory.available, rss_bytes=rss)


def _with_gpu_processes(gpus: tuple[DeviceMemory, ...]) -> tuple[tuple[DeviceMemory, ...], str]:
    """The GPU rows with NVML's process lists, and how NVML fared. NVML is optional."""
    try:
        import pynvml
    except Exception:
        return gpus, "not installed"
    try:
        pynvml.nvmlInit()
    except Exception as error:
        return gpus, f"unavailable ({error})"
    try:
        return tuple(replace(gpu, processes=_gpu_processes(pynvml, gpu.uuid)) for gpu in gpus), "ok"
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def _gpu_processes(pynvml: Any, uuid: str | None) -> tuple[GpuProcess, ...] | None:
    # CUDA ordinals are not NVML indices (CUDA_VISIBLE_DEVICES renumbers and reorders devices):
    # the UUID is the one name both agree on. torch prints it bare; NVML wants "GPU-"/"MIG-".
    if uuid is None:
        return None
    candidates = [uuid] if uuid.startswith(("GPU-", "MIG-")) else [f"GPU-{uuid}", f"MIG-{uuid}"]
    for candidate in candidates:
        try:
            handle = pynvml.nvmlDeviceGetHandleByUUID(candidate)
            infos = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
            break
        except Exception:
            continue
    else:
        return None
    pids = [info.pid for info in infos]
    ours = os.getpid() in pids  # else a container: its pids are not the host's NVML reports
    return tuple(
        GpuProcess(info.pid, _nvml_bytes(info.usedGpuMemory), (info.pid == os.getpid()) if ours else None)
        for info in infos
    )


def _nvml_bytes(value: Any) -> int | None:
    # pynvml maps NVML_VALUE_NOT_AVAILABLE to None; older bindings pass the raw 2**64 - 1 through.
    return value if type(value) is int and 0 <= value < 2**63 else None
