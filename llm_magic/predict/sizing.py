"""Sizes of the model built on the meta device, per tensor, per device and per module.

Element sizes are the meta model's, except where loading casts (the keep-in-fp32 rules) and
where a quantizer counts its own sizes. Per-device figures follow a device map the way
accelerate reads one: a tensor goes where its longest mapped prefix goes.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from llm_magic.compat import CompatError
from llm_magic.compat import transformers as tf
from llm_magic.names import sort_devices
from llm_magic.predict.replay import Replayed
from llm_magic.predict.result import Draft


def tensor_sizes(replayed: Replayed, draft: Draft) -> tuple[dict[str, int], Draft]:
    """(name -> bytes of every parameter and buffer the loaded model will hold, tied weights once; draft).

    Checkpoint tensors matched by the keep-in-fp32 rules (4.57 `keep_in_fp32_regex`, 5.x
    `_get_dtype_plan`, e.g. DeepSeek-V3's `e_score_correction_bias`) load in float32, which the
    placement helpers do not count: they are counted here.
    """
    import torch

    model = replayed.model
    quantized = tf.quantized_sizes(model, replayed.hf_quantizer)
    if quantized is not None:
        return quantized, draft
    try:
        upcast = tf.upcast_rule(model, replayed.dtype, replayed.keep_regex)
    except CompatError as error:
        upcast = None
        draft = draft.noted(f"weights kept in float32 on load are unknown ({error}): counted in {draft.dtype}")
    loaded = set(model.state_dict().keys()) if upcast is not None else set()
    tied = tf.tied_names(model)
    out: dict[str, int] = {}
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if name in tied:
            continue
        size = tensor.numel() * tensor.element_size()
        if upcast is not None and name in loaded and tensor.is_floating_point():
            target = upcast(name)
            if target is not None:
                size = tensor.numel() * torch.empty((), dtype=target, device="meta").element_size()
        out[name] = size
    return out, draft


def device_of(name: str, device_map: Mapping[str, str]) -> str | None:
    """The device a tensor or module named `name` goes to: its longest prefix in the map."""
    probe = name
    while True:
        if probe in device_map:
            return device_map[probe]
        if probe == "":
            return None
        probe = probe.rsplit(".", 1)[0] if "." in probe else ""


def bytes_by_device(sizes: Mapping[str, int], device_map: Mapping[str, str]) -> tuple[dict[str, int], int]:
    """(bytes per device, bytes the map does not cover)."""
    totals: dict[str, int] = {}
    uncovered = 0
    for name, size in sizes.items():
        device = device_of(name, device_map)
        if device is None:
            uncovered += size
            continue
        totals[device] = totals.get(device, 0) + size
    return totals, uncovered


def modules_by_device(model: Any, sizes: Mapping[str, int], device_map: Mapping[str, str]) -> dict[str, int]:
    """Modules per device, counted as `measure.placement` counts a loaded model's.

    A module counts when it directly owns a parameter or buffer, on the device that holds most
    of its bytes (ties: the first in display order). Tied weights count for every module that
    owns them (the loaded model's `lm_head` owns the embedding's weight too), at the size of the
    tensor they alias.
    """
    per_module: dict[str, dict[str, int]] = {}
    for name, tensor in _all_tensors(model):
        device = device_of(name, device_map)
        if device is None:
            continue
        module = name.rpartition(".")[0]
        size = sizes.get(name, tensor.numel() * tensor.element_size())
        per_module.setdefault(module, {}).setdefault(device, 0)
        per_module[module][device] += size
    counts: dict[str, int] = {}
    for per_device in per_module.values():
        device = max(sort_devices(per_device), key=per_device.__getitem__)
        counts[device] = counts.get(device, 0) + 1
    return {device: counts[device] for device in sort_devices(counts)}


def _all_tensors(model: Any):
    """Every (name, tensor) of parameters and buffers, a tensor shared by several modules once per name."""
    named: Callable = model.named_parameters
    yield from named(remove_duplicate=False)
    yield from model.named_buffers(remove_duplicate=False)


def largest_layer(model: Any, sizes: Mapping[str, int], no_split: set[str]) -> int:
    """Largest leaf module or no-split block: the room the algorithm keeps on its main device."""
    module_sizes: dict[str, int] = {}
    for name, size in sizes.items():
        parts = name.split(".")
        for i in range(len(parts)):
            key = ".".join(parts[:i])
            module_sizes[key] = module_sizes.get(key, 0) + size
    largest = 0
    for name, module in model.named_modules():
        if name and (not list(module.children()) or type(module).__name__ in no_split):
            largest = max(largest, module_sizes.get(name, 0))
    return largest
