"""Memory per device, now, and the budget `from_pretrained(device_map="auto")` would see.

Nothing here creates a CUDA context or allocates on a device: a context costs hundreds of MiB on
every GPU it touches, which is the memory the user is trying to get back. So CUDA is measured
only when the process has already initialised it, and `mem_get_info` (which creates a context
on the device it asks about) only on devices where PyTorch already holds memory. torch is never
imported here: a process without it has no tensors to measure.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any, Mapping

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
        }


def memory_snapshot() -> MemorySnapshot:
    """Memory of every device this process can see, without touching what is not yet in use."""
    cuda_state, count, gpus = _cuda_memory(loaded_torch())
    nvml_state = "not queried"
    if gpus:
        gpus, nvml_state = _with_gpu_processes(gpus)
    return MemorySnapshot((*gpus, _cpu_memory()), cuda_state, count, nvml_state)


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


# ---------------------------------------------------------------------------------------------
# The budget of a `device_map="auto"` load
#
# `loader_budget` is the one place that knows how each transformers version turns free memory
# into the budget its placement gets; `preflight.transformers_budget`, `autoload_budget` and
# `loader_max_memory` all call it. It lives here, beside the figures it is computed from, because
# this module is light (no torch, no transformers at import) and the pre-flight already depends
# on it, not the reverse.


def loader_budget(
    free: Mapping[str, int | None],
    cached_unused: Mapping[str, int] | None = None,
    *,
    transformers_version: str | tuple[int, int] | None = None,
    sequential: bool = False,
) -> dict[str, int | None]:
    """Bytes per device `from_pretrained(device_map=...)` gives its placement when the user sets no `max_memory`.

    `free`: per device name ("cuda:0", "cpu"), the bytes the load will find: on a GPU the driver's
    free memory plus PyTorch's cached-but-unused memory (both versions add that cache), on the
    cpu psutil's available RAM. None: unknown, and so is that device's budget. Leave "cpu" out
    on integrated GPUs (host RAM is the GPU's memory: accelerate gives the cpu no budget).
    `cached_unused`: the part of a GPU's `free` that is PyTorch's cache; only 4.x treats it apart.
    `sequential`: `device_map="sequential"`, which skips `get_balanced_memory` and its 90% cut.

    The rules (read in the code of transformers 4.57 and 5.23, accelerate 1.15):
    - 5.x `integrations.accelerate.get_max_memory`: driver free + cache per GPU, 90% of the cpu;
      then its `get_balanced_memory` takes 90% of the first GPU when exactly one GPU has a
      positive figure.
    - 4.57 `modeling_utils._get_device_map`: accelerate's `get_balanced_memory` on driver free
      alone (90% of the first GPU when exactly one has driver memory left), then the cache is
      added; the cpu at 100% of available.
    Balancing across several GPUs comes later and depends on the model: not done here. The
    result, passed back as `max_memory`, makes both versions place exactly as they would have
    (neither scales a user's `max_memory`). Quantizers' `adjust_max_memory` is not applied.
    Keys: the accelerators in ordinal order, then "cpu" when `free` has it.
    """
    cached = cached_unused or {}
    v5 = _major(transformers_version) >= 5
    accelerators = sorted((d for d in free if d not in ("cpu", "disk", "meta")), key=lambda d: (len(d), d))

    def counted(device: str) -> int | None:
        value = free[device]
        return value if value is None or v5 else value - cached.get(device, 0)

    # get_balanced_memory counts GPUs with a positive figure (an unknown one takes part) and
    # cuts the first GPU key, whichever that is.
    single = not sequential and sum(1 for d in accelerators if counted(d) is None or counted(d) > 0) == 1
    budget: dict[str, int | None] = {}
    for index, device in enumerate(accelerators):
        figure = counted(device)
        if figure is None:
            budget[device] = None
            continue
        cut = int(figure * 0.9) if single and index == 0 else figure
        budget[device] = cut if v5 else cut + cached.get(device, 0)
    if "cpu" in free:
        available = free["cpu"]
        budget["cpu"] = None if available is None else (int(available * 0.9) if v5 else available)
    return budget


def free_after_release(
    snapshot: MemorySnapshot,
    freed: Mapping[str, int] | None = None,
    *,
    empty_cache: bool = True,
) -> tuple[dict[str, int | None], dict[str, int]]:
    """(free, cached_unused) per device name once the release step has freed `freed`, for `preflight.predict`.

    `freed`: bytes the release will free per device ("cuda:0", "cpu"). `empty_cache`: the release
    hands PyTorch's cached blocks back to the driver (`release.collect_garbage` does whenever CUDA
    is initialised), so every GPU's cache counts as driver-free and `cached_unused` is 0. False:
    the cache the snapshot shows stays cached (what `autoload_budget` models).

    Every GPU the load would use gets an entry. One whose free memory is unknown (CUDA not
    initialised in this process, or nothing of ours on it yet: measuring would create a context)
    gets None: `predict` then says its `device_map="auto"` placement is unknown, while a plain
    cpu load or an explicit map is still predicted. Without torch or CUDA only "cpu" is there.
    Freed RAM is counted as returned to the system; small allocations may stay in the allocator.
    """
    freed = freed or {}
    free: dict[str, int | None] = {}
    cached: dict[str, int] = {}
    for index in range(snapshot.cuda_device_count or 0):
        name = f"cuda:{index}"
        usable, _ = snapshot.usable_free(name)
        if usable is None:
            free[name] = None
            continue
        free[name] = usable + freed.get(name, 0)
        cached[name] = 0 if empty_cache else snapshot.device(name).reserved_unused_bytes or 0
    cpu = snapshot.device("cpu")
    if cpu is not None:
        free["cpu"] = None if cpu.free_bytes is None else cpu.free_bytes + freed.get("cpu", 0)
    return free, cached


def autoload_budget(
    snapshot: MemorySnapshot,
    extra_free: dict[str, int] | None = None,
    *,
    transformers_version: str | None = None,
) -> dict[int | str, int | None]:
    """The `max_memory` that `from_pretrained(device_map="auto")` would build now, with no user `max_memory`.

    Keys are as accelerate writes them: GPU ordinals, then "cpu". A GPU's value is None when it
    cannot be known without creating a CUDA context (CUDA not initialised, or nothing of this
    process on that GPU yet); the load will also pay for that context there. `extra_free` is what
    the release step will free first, per device name ("cuda:0", "cpu"); freed GPU memory is
    counted as returned to the driver while the cache the snapshot shows stays cached, the
    smaller of the possible budgets on 4.x. The rules: `loader_budget`.
    """
    free, cached = free_after_release(snapshot, extra_free, empty_cache=False)
    return _as_accelerate_keys(snapshot, free, cached, transformers_version, False)


def loader_max_memory(
    snapshot: MemorySnapshot,
    *,
    transformers_version: str | None = None,
    sequential: bool = False,
) -> dict[int | str, int] | None:
    """An explicit `max_memory` for `from_pretrained(device_map="auto")`, from a snapshot taken after the release.

    Equal to the budget the load would compute itself in a fresh process with the same free
    memory: PyTorch's cache counts as free (a fresh process has none; the release empties it),
    and the installed version's margins apply (`loader_budget`). Passed as `max_memory`, it gives
    the placement the load gives without one, so what the process held before cannot shift it.

    None when a figure is unknown (CUDA not initialised here, or a GPU this process holds nothing
    on): pass no `max_memory` then. This process holds no memory on such GPUs, so the load's
    own measurement there is already a fresh process's.
    """
    free, cached = free_after_release(snapshot, empty_cache=True)
    budget = _as_accelerate_keys(snapshot, free, cached, transformers_version, sequential)
    if any(value is None for value in budget.values()):
        return None
    return budget  # type: ignore[return-value]


def _as_accelerate_keys(snapshot, free, cached, version, sequential) -> dict[int | str, int | None]:
    # accelerate's get_max_memory gives no "cpu" entry on integrated CUDA devices.
    if any(row.integrated for row in snapshot.cuda_devices):
        free = {name: value for name, value in free.items() if name != "cpu"}
    budget = loader_budget(free, cached, transformers_version=version, sequential=sequential)
    return {(int(name[5:]) if name.startswith("cuda:") else name): value for name, value in budget.items()}


def _major(version: str | tuple[int, int] | None) -> int:
    if isinstance(version, tuple):
        return version[0]
    if version is None:
        import transformers

        version = transformers.__version__
    head = version.split(".", 1)[0]
    return int(head) if head.isdigit() else 0
