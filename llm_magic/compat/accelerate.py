"""accelerate's internals the package reads, from one place.

Two kinds of use:
- one helper called by name: `convert_file_size_to_int` ("20GiB" -> bytes in a user's
  `max_memory`), through `file_size`;
- the attributes of the hooks `dispatch_model` attaches to a model, read to tell where an
  offloaded weight lives and where a layer computes. They are instance attributes of
  `AlignDevicesHook` / `SequentialHook` and of the weights maps (`PrefixedDataset`,
  `OffloadedWeightsLoader`), read from the instance `__dict__` (`engine.shapes.instance_dict`) so
  no user code or property runs; an attribute that is not there reads as "no offload record"
  (the caller then reports the bytes as unknown), never as an error.

Checked against accelerate 1.15 `hooks.AlignDevicesHook.init_hook`, `big_modeling.dispatch_model`
and `utils/offload.py`, with transformers 4.57 and 5.23.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llm_magic.compat import CompatError, Symbol, resolve
from llm_magic.engine.shapes import instance_dict

FILE_SIZE = Symbol("accelerate", "accelerate.utils", "convert_file_size_to_int",
                   "sizes written as strings in a user's max_memory")

# The hook attributes read are instance state, not module symbols: `_hf_hook`, `hooks`,
# `offload`, `weights_map`, `execution_device`, `place_submodules`, `dataset`, `prefix`, `state_dict`, `index`,
# `save_folder`. Each is read with a default, so a renamed one reads as "unknown".


def private_symbols() -> tuple[Symbol, ...]:
    return (FILE_SIZE,)


def file_size(value: Any) -> int | float:
    """A `max_memory` value as bytes: ints as given, strings like "20GiB" / "200KB" as accelerate reads them."""
    if not isinstance(value, str):
        return value
    try:
        return resolve(FILE_SIZE)(value)
    except CompatError:
        raise
    except Exception as error:  # noqa: BLE001 - what accelerate says about a malformed size
        raise ValueError(f"max_memory value {value!r} is not a size accelerate reads ({error})") from None


# --------------------------------------------------------------------------- hooks


def module_hooks(module: Any) -> list[Any]:
    """The accelerate hooks on `module`: its `_hf_hook`, or each hook of a SequentialHook."""
    hook = (instance_dict(module) or {}).get("_hf_hook")
    if hook is None:
        return []
    # A SequentialHook (from add_hook_to_module(..., append=True)) chains several.
    inner = (instance_dict(hook) or {}).get("hooks")
    return list(inner) if type(inner) in (tuple, list) else [hook]


def offload_weights_map(hook: Any) -> Any | None:
    """The weights map of a hook that offloads its module's weights, else None."""
    attrs = instance_dict(hook) or {}
    weights_map = attrs.get("weights_map")
    return weights_map if attrs.get("offload") is True and weights_map is not None else None


def loads_submodules(hook: Any) -> bool:
    """Does the hook load its submodules' weights too (`place_submodules`), not only its module's own?"""
    return (instance_dict(hook) or {}).get("place_submodules") is True


def execution_device(hook: Any) -> Any | None:
    """The device a hook moves its module's inputs and weights to for the forward pass, or None."""
    return (instance_dict(hook) or {}).get("execution_device")


@dataclass(frozen=True)
class OffloadedWeight:
    """Where one offloaded weight is kept: a tensor in RAM, or an entry of a disk index."""

    key: str  # the weight's name in the map (a PrefixedDataset's prefix applied)
    tensor: Any = None  # the tensor itself (cpu offload), when in RAM
    index_entry: dict | None = None  # the disk index entry ({"safetensors_file": ..., "weight_name": ...})
    save_folder: Any = None  # the offload folder of the index, when it has one


def find_offloaded(weights_map: Any, key: str) -> OffloadedWeight | None:
    """The record of weight `key` (relative to the hooked module) in a weights map, or None."""
    map_attrs = instance_dict(weights_map) or {}
    if "dataset" in map_attrs and type(map_attrs.get("prefix")) is str:  # PrefixedDataset
        weights_map, key = map_attrs["dataset"], map_attrs["prefix"] + key
        map_attrs = instance_dict(weights_map) or {}
    if type(weights_map) is dict:
        # A plain state dict (accelerate's cpu_offload): the tensors themselves, in RAM.
        tensor = weights_map.get(key)
        return None if tensor is None else OffloadedWeight(key, tensor=tensor)
    state_dict, index = map_attrs.get("state_dict"), map_attrs.get("index")
    if type(state_dict) is dict and key in state_dict:
        # OffloadedWeightsLoader: its state dict wins over its index when it reads a weight.
        return OffloadedWeight(key, tensor=state_dict[key])
    if type(index) is dict and key in index:
        entry = index[key] if type(index[key]) is dict else {}
        return OffloadedWeight(key, index_entry=entry, save_folder=map_attrs.get("save_folder"))
    return None
