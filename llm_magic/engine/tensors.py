"""What holds tensors, and how many bytes on which device, counted once per storage.

torch is never imported here: if the user's process has not imported it, no tensor can exist,
and every answer is "nothing". That keeps `%load_ext` and the scans free for non-torch users.
"""

from __future__ import annotations

import contextlib
import sys
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

from llm_magic.engine.walk import (
    ROOT_BUDGET,
    TOTAL_BUDGET,
    WalkStats,
    paused_gc,
    walk_leaves,
)


def loaded_torch():
    """The torch module if the process has imported it, else None (never imports it)."""
    return sys.modules.get("torch")


def is_tensor(obj: Any) -> bool:
    torch = loaded_torch()
    # type(), not isinstance(): an object's `__class__` can be a property that raises or lies.
    return torch is not None and issubclass(type(obj), torch.Tensor)


def is_module(obj: Any) -> bool:
    torch = loaded_torch()
    return torch is not None and issubclass(type(obj), torch.nn.Module)


def is_tensor_holder_leaf(obj: Any) -> bool:
    """A unit of memory a user thinks of as one thing: a tensor or a torch module."""
    return is_tensor(obj) or is_module(obj)


@dataclass(frozen=True)
class Storage:
    """One allocation: tensors that share it (views, tied weights) count once."""

    device: str  # "cuda:0", "cpu", "meta", ...
    key: tuple  # identifies the allocation among live ones
    nbytes: int


def tensor_storage(tensor: Any) -> Storage:
    # A subclass's `__torch_function__` sees every attribute read (`.device`, `.numel()`):
    # user code that can raise (the bytes would be lost) or count. Read the plain tensor.
    with _plain_tensor_reads():
        return _tensor_storage(tensor)


def _plain_tensor_reads():
    torch = loaded_torch()
    disable = getattr(getattr(torch, "_C", None), "DisableTorchFunctionSubclass", None)
    return disable() if disable is not None else contextlib.nullcontext()


def is_fake(tensor: Any) -> bool:
    """A FakeTensor (PyTorch's FakeTensorMode, what `%llmfit` simulates with): it claims a device
    but has no memory. Known by its class's name: the class itself is private to torch."""
    kind = type(tensor)
    return kind.__name__ == "FakeTensor" and kind.__module__.startswith("torch._subclasses")


def _tensor_storage(tensor: Any) -> Storage:
    device = str(tensor.device)
    if device == "meta" or is_fake(tensor):
        # No memory behind it; the bytes are what it would take (for offload accounting). A
        # fake tensor's data pointer must not even be read (PyTorch warns, and will raise).
        return Storage("meta", ("meta", id(tensor)), tensor.numel() * tensor.element_size())
    try:
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        nbytes = storage.nbytes()
    except Exception:
        # Wrapper subclasses (and some quantized types) have no plain storage: count the
        # tensor itself, once.
        return Storage(device, (device, "tensor", id(tensor)), tensor.numel() * tensor.element_size())
    if pointer == 0:
        return Storage(device, (device, "empty", id(tensor)), 0)
    return Storage(device, (device, pointer), nbytes)


def module_tensors(module: Any) -> Iterator[tuple[str, Any]]:
    """(qualified name, tensor) for every parameter and buffer of a module and its children."""
    try:
        named = list(module.named_modules(remove_duplicate=True))
    except Exception:
        return
    for prefix, submodule in named:
        for table_name in ("_parameters", "_buffers"):
            table = getattr(submodule, table_name, None)
            if type(table) is not dict:
                continue
            for name, tensor in table.items():
                if tensor is not None and is_tensor(tensor):
                    yield (f"{prefix}.{name}" if prefix else name), tensor


def tensors_of(obj: Any) -> Iterator[Any]:
    """The tensors that `obj` itself is or owns directly (a tensor, or a module's weights)."""
    if is_tensor(obj):
        yield obj
    elif is_module(obj):
        for _, tensor in module_tensors(obj):
            yield tensor


def find_tensor_holders(
    roots: Iterable[tuple[str, Any]],
    *,
    budget: int | None = ROOT_BUDGET,
    total: int | None = TOTAL_BUDGET,
    stats: WalkStats | None = None,
) -> Iterator[tuple[str, Any]]:
    """(path, tensor-or-module) for each tensor holder reachable from the named roots.

    `budget` is per root. A generator: callers pause automatic gc around it (walk.paused_gc).
    """
    if loaded_torch() is None:
        return iter(())
    leaves = walk_leaves(roots, is_leaf=is_tensor_holder_leaf, budget=budget, total=total, stats=stats)
    return ((path, obj) for _, path, obj in leaves)


def holds_tensors(obj: Any, *, budget: int = ROOT_BUDGET, stats: WalkStats | None = None) -> bool:
    """Does `obj` hold (directly or inside) a tensor with data, or a module with weights?

    False may mean "not within the budget": `stats.truncated` then says so.
    """
    with paused_gc():
        for _, leaf in find_tensor_holders([("", obj)], budget=budget, stats=stats):
            for tensor in tensors_of(leaf):
                return True
    return False


class Footprint:
    """Bytes per device of a set of objects, each storage counted once."""

    def __init__(self) -> None:
        self._storages: dict[tuple, Storage] = {}

    def add(self, obj: Any) -> "Footprint":
        for tensor in tensors_of(obj):
            try:
                storage = tensor_storage(tensor)
            except Exception:
                continue
            self._storages.setdefault(storage.key, storage)
        return self

    def add_all(self, objs: Iterable[Any]) -> "Footprint":
        for obj in objs:
            self.add(obj)
        return self

    def merge(self, other: "Footprint") -> "Footprint":
        for key, storage in other._storages.items():
            self._storages.setdefault(key, storage)
        return self

    def restricted_to(self, keys: Iterable[tuple]) -> "Footprint":
        part = Footprint()
        part._storages = {key: self._storages[key] for key in keys if key in self._storages}
        return part

    @property
    def storage_keys(self) -> frozenset[tuple]:
        return frozenset(self._storages)

    def by_device(self, *, include_meta: bool = False) -> dict[str, int]:
        totals: dict[str, int] = defaultdict(int)
        for storage in self._storages.values():
            if storage.device == "meta" and not include_meta:
                continue
            totals[storage.device] += storage.nbytes
        return dict(totals)

    @property
    def total(self) -> int:
        return sum(self.by_device().values())


def footprint_of(obj: Any) -> Footprint:
    """The storages `obj` holds, walking into containers (shared storage once)."""
    with paused_gc():
        return Footprint().add_all(leaf for _, leaf in find_tensor_holders([("", obj)]))


def bytes_by_device(obj: Any) -> dict[str, int]:
    return footprint_of(obj).by_device()
