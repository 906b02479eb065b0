"""Where a loaded model's weights are: bytes and modules per device, including offloaded parts.

`hf_device_map` is not enough to answer this: transformers 5 sets it only when a model spans
several devices (or disk), and it says where accelerate *meant* to put each module, not where
the bytes are (buffers of an offloaded module stay on the execution device, for instance). So
every parameter and buffer is looked at:

- a tensor with data counts on its own device, once per storage (tied weights count once);
- a `meta` tensor has no data: if accelerate offloaded it, an `AlignDevicesHook` with
  `offload=True` on its module or an ancestor (alone, or inside a `SequentialHook`) holds a
  `weights_map`. Looking the tensor's name up there tells where it lives: in the loader's
  `state_dict` it is a real tensor in RAM ("cpu"), in its `index` it is read from a file on every
  forward pass ("disk"). Checked against accelerate 1.15 `hooks.AlignDevicesHook.init_hook`,
  `big_modeling.dispatch_model` and `utils/offload.py` (`PrefixedDataset`,
  `OffloadedWeightsLoader`), with transformers 4.57 and 5.23.
- a `meta` tensor nobody can account for stays on the "meta" row: truly unknown.

"Module count": a module counts when it directly owns at least one parameter or buffer (a
`Linear`, a norm, an embedding; not the decoder layer that contains them), on the device that
holds most of its bytes. These are the modules accelerate hooks to offload, and a count that does
not change with how deep a model nests its layers.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from llm_magic.compat.accelerate import (
    find_offloaded,
    module_hooks,
    offload_weights_map,
)
from llm_magic.engine.shapes import instance_dict
from llm_magic.engine.tensors import is_module, module_tensors, tensor_storage
from llm_magic.names import dtype_name, is_accelerator, sort_devices
from llm_magic.units import format_bytes


def find_model(obj: Any):
    """The torch module `obj` is, or holds as `.model` (a pipeline), else None.

    `.model` is read from the instance `__dict__`: no user `__getattr__` runs, and an object that
    lies about its class is judged by its real type.
    """
    if is_module(obj):
        return obj
    attrs = instance_dict(obj)
    if attrs is not None:
        inner = attrs.get("model")
        if is_module(inner):
            return inner
    return None


@dataclass(frozen=True)
class DevicePlacement:
    """One device's share of a model."""

    device: str  # "cuda:0", ..., "cpu", "disk", or "meta" (no data and no offload record)
    modules: int  # modules owning a tensor directly, with most of their bytes here
    nbytes: int  # parameters + buffers here, each storage once
    share: float  # nbytes / the model's total, 0.0 for an empty model

    def to_dict(self) -> dict:
        return {"device": self.device, "modules": self.modules, "nbytes": self.nbytes, "share": self.share}


@dataclass(frozen=True)
class DiskSource:
    """A place on disk that offloaded weights are read from at every forward pass."""

    path: str
    kind: str  # "safetensors": a checkpoint file read in place; "offload_folder": weights re-saved
    nbytes: int | None  # size on disk (a folder: its files); None when it cannot be read

    def to_dict(self) -> dict:
        return {"path": self.path, "kind": self.kind, "nbytes": self.nbytes}


@dataclass(frozen=True)
class ModelPlacement:
    name: str  # what the user calls the model
    class_name: str
    total_bytes: int  # all rows together, each storage once
    rows: tuple[DevicePlacement, ...]  # accelerators by index, then cpu, disk, meta
    dtypes: dict[str, int]  # dtype name ("bfloat16") -> bytes, largest first
    hf_device_map: dict[str, Any] | None  # a copy of accelerate's map, None if the model has none
    disk_sources: tuple[DiskSource, ...]

    def row(self, device: str) -> DevicePlacement | None:
        for row in self.rows:
            if row.device == device:
                return row
        return None

    @property
    def accelerator_rows(self) -> tuple[DevicePlacement, ...]:
        return tuple(row for row in self.rows if is_accelerator(row.device))

    def offloaded_devices(self, accelerator_present: bool = False) -> tuple[str, ...]:
        """The slow tiers this model uses: disk always; cpu when an accelerator is there.

        An accelerator is there when the model has a row on one, or the caller says the machine
        has one (a model wholly on cpu next to an idle GPU is the silent-offload case too).
        """
        accelerated = accelerator_present or bool(self.accelerator_rows)
        slow = ("cpu", "disk") if accelerated else ("disk",)
        return tuple(row.device for row in self.rows if row.device in slow and row.nbytes > 0)

    def slow_tier_warning(self, accelerator_present: bool) -> str | None:
        """One plain sentence when part of the model sits where generation is slow, else None."""
        devices = self.offloaded_devices(accelerator_present)
        if not devices:
            return None
        parts = []
        for device in devices:
            row = self.row(device)
            noun = "module" if row.modules == 1 else "modules"
            parts.append(f"{row.modules} {noun} ({format_bytes(row.nbytes)}, {row.share:.0%}) on {device}")
        if "disk" in devices:
            consequence = "generation will be very slow (those weights are read from disk at every step)"
        else:
            consequence = "generation will be slow (an accelerator is there, but not used for them)"
        return f"{self.name} has {' and '.join(parts)}: {consequence}."

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "class_name": self.class_name,
            "total_bytes": self.total_bytes,
            "rows": [row.to_dict() for row in self.rows],
            "dtypes": dict(self.dtypes),
            "hf_device_map": None if self.hf_device_map is None else dict(self.hf_device_map),
            "disk_sources": [source.to_dict() for source in self.disk_sources],
        }


@dataclass(frozen=True)
class _Located:
    """Where one tensor's bytes are, and how to count them once."""

    device: str
    key: tuple  # equal keys are the same bytes
    nbytes: int
    source: DiskSource | None = None


def model_placement(model: Any, name: str) -> ModelPlacement:
    """Bytes and modules per device for a loaded torch module (see the module docstring)."""
    if not is_module(model):
        raise TypeError(f"{name} is a {type(model).__name__}, not a torch module (use find_model)")
    counted: dict[tuple, _Located] = {}
    dtype_bytes: dict[str, int] = defaultdict(int)
    # Per owning module: bytes per device, to put the module on the device with most of them.
    module_bytes: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for qualified_name, tensor, located in _located_tensors(model):
        module_bytes[qualified_name.rpartition(".")[0]][located.device] += located.nbytes
        if located.key not in counted:
            counted[located.key] = located
            dtype_bytes[dtype_name(tensor.dtype)] += located.nbytes

    device_bytes: dict[str, int] = defaultdict(int)
    for located in counted.values():
        device_bytes[located.device] += located.nbytes
    device_modules: dict[str, int] = defaultdict(int)
    for per_device in module_bytes.values():
        # max() keeps the first of equals: ties go to the first device in display order.
        device_modules[max(sort_devices(per_device), key=per_device.__getitem__)] += 1

    total = sum(device_bytes.values())
    rows = []
    for device in sort_devices(set(device_bytes) | set(device_modules)):
        nbytes = device_bytes.get(device, 0)
        share = nbytes / total if total else 0.0
        rows.append(DevicePlacement(device, device_modules.get(device, 0), nbytes, share))
    sources = {located.source.path: located.source for located in counted.values() if located.source}
    return ModelPlacement(
        name=name,
        class_name=type(model).__name__,
        total_bytes=total,
        rows=tuple(rows),
        dtypes=dict(sorted(dtype_bytes.items(), key=lambda item: -item[1])),
        hf_device_map=_device_map_copy(model),
        disk_sources=tuple(sources[path] for path in sorted(sources)),
    )


def _located_tensors(model: Any) -> list[tuple[str, Any, _Located]]:
    """(qualified name, tensor, where its bytes are) for every parameter and buffer."""
    try:
        modules = dict(model.named_modules())
    except Exception:
        return []  # a module that breaks its own traversal: module_tensors sees nothing either
    named = list(module_tensors(model))
    # A tied weight is one tensor under several names; accelerate may record it under one of
    # them only (4.57, and 5.x re-saved weights, index the first name), so all are tried.
    names_of: dict[int, list[str]] = defaultdict(list)
    for qualified_name, tensor in named:
        names_of[id(tensor)].append(qualified_name)
    located_of: dict[int, _Located] = {}
    for _, tensor in named:
        if id(tensor) not in located_of:
            located_of[id(tensor)] = _locate(tensor, names_of[id(tensor)], modules)
    return [(qualified_name, tensor, located_of[id(tensor)]) for qualified_name, tensor in named]


def _device_map_copy(model: Any) -> dict[str, Any] | None:
    device_map = (instance_dict(model) or {}).get("hf_device_map")
    if type(device_map) is not dict:
        return None
    # Values are "cpu"/"disk", GPU ordinals, or torch.device objects (4.x with device_map="cpu").
    return {str(key): value if type(value) in (int, str) else str(value) for key, value in device_map.items()}


def _locate(tensor: Any, names: list[str], modules: dict[str, Any]) -> _Located:
    try:
        storage = tensor_storage(tensor)
    except Exception:
        # A tensor subclass that will not say its device or size: unknown, not a failed report.
        return _Located("meta", ("unreadable", id(tensor)), 0)
    if storage.device != "meta":
        return _Located(storage.device, storage.key, storage.nbytes)
    for qualified_name in names:
        found = _offload_record(qualified_name, modules)
        if found is None:
            continue
        located = _located_in_weights_map(*found, meta_bytes=storage.nbytes)
        if located is not None:
            return located
    return _Located("meta", storage.key, storage.nbytes)


def _offload_record(qualified_name: str, modules: dict[str, Any]) -> tuple[Any, str] | None:
    """(weights_map, key within it) from the nearest offloading hook on the tensor's module or above."""
    parts = qualified_name.split(".")
    # Nearest module first: the owning module, then each ancestor up to the root ("").
    for depth in range(len(parts) - 1, -1, -1):
        module_path = ".".join(parts[:depth])
        module = modules.get(module_path)
        if module is None:
            continue
        for hook in module_hooks(module):
            weights_map = offload_weights_map(hook)
            if weights_map is not None:
                # accelerate names offloaded tensors relative to the hooked module.
                return weights_map, ".".join(parts[depth:])
    return None


def _located_in_weights_map(weights_map: Any, key: str, *, meta_bytes: int) -> _Located | None:
    found = find_offloaded(weights_map, key)
    if found is None:
        return None
    if found.index_entry is None:
        return _real(found.tensor)  # in RAM
    entry, key = found.index_entry, found.key
    source, file_key = _disk_source(entry, key, found.save_folder)
    # Tied weights both offloaded point at one stored tensor: count it once.
    return _Located("disk", ("disk", file_key, entry.get("weight_name", key)), meta_bytes, source)


def _real(tensor: Any) -> _Located | None:
    if tensor is None:
        return None
    try:
        storage = tensor_storage(tensor)
    except Exception:
        return None
    if storage.device == "meta":
        return None
    return _Located(storage.device, storage.key, storage.nbytes)


def _disk_source(entry: dict, key: str, save_folder: Any) -> tuple[DiskSource | None, str]:
    """The file or folder a disk-offloaded weight is read from, and the file it is in."""
    folder = os.fspath(save_folder) if save_folder is not None else None
    file = entry.get("safetensors_file")
    if file is not None:
        file = os.fspath(file)
        # transformers 5 re-saves non-safetensors weights one file each into offload_folder.
        if folder is not None and os.path.dirname(os.path.abspath(file)) == os.path.abspath(folder):
            return DiskSource(folder, "offload_folder", _folder_size(folder)), file
        return DiskSource(file, "safetensors", _file_size(file)), file
    if folder is not None:
        # accelerate's own format (transformers 4.x): `<name>.dat` memmaps next to index.json.
        return DiskSource(folder, "offload_folder", _folder_size(folder)), os.path.join(folder, f"{key}.dat")
    return None, key


def _file_size(path: str) -> int | None:
    try:
        return os.stat(path).st_size
    except OSError:
        return None


def _folder_size(path: str) -> int | None:
    try:
        with os.scandir(path) as entries:
            return sum(entry.stat().st_size for entry in entries if entry.is_file())
    except OSError:
        return None
