"""Sizes of the model built on the meta device, per tensor, per device and per module.

Element sizes are the meta model's, except where loading casts (the keep-in-fp32 rules) and
where a quantizer counts its own sizes. Per-device figures follow a device map the way
accelerate dispatches one: a tensor goes where its longest mapped prefix goes, except the
buffers of offloaded modules, which stay on the execution device.
"""

from __future__ import annotations

from typing import Any, Mapping

from llm_magic.compat import CompatError
from llm_magic.compat import transformers as tf
from llm_magic.names import is_accelerator, sort_devices
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


def bytes_by_device(model: Any, sizes: Mapping[str, int], device_map: Mapping[str, str]) -> tuple[dict[str, int], int]:
    """(bytes per device where the load will hold them, bytes the map does not cover)."""
    buffers = {name for name, _ in model.named_buffers()}
    placed = Dispatch(device_map)
    totals: dict[str, int] = {}
    uncovered = 0
    for name, size in sizes.items():
        device = placed.device(name, name in buffers)
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
    placed = Dispatch(device_map)
    per_module: dict[str, dict[str, int]] = {}
    tensors = [(name, tensor, False) for name, tensor in model.named_parameters(remove_duplicate=False)]
    tensors += [(name, tensor, True) for name, tensor in model.named_buffers(remove_duplicate=False)]
    for name, tensor, is_buffer in tensors:
        device = placed.device(name, is_buffer)
        if device is None:
            continue
        owner = per_module.setdefault(name.rpartition(".")[0], {})
        owner[device] = owner.get(device, 0) + sizes.get(name, tensor.numel() * tensor.element_size())
    counts: dict[str, int] = {}
    for per_device in per_module.values():
        device = max(sort_devices(per_device), key=per_device.__getitem__)
        counts[device] = counts.get(device, 0) + 1
    return {device: counts[device] for device in sort_devices(counts)}


class Dispatch:
    """Where accelerate's `dispatch_model` puts each tensor of a model loaded with `device_map`.

    Parameters go where the map says. Buffers of offloaded modules do not: with
    `offload_buffers=False` (the default of from_pretrained) they are moved to the execution
    device, the main device of the map (its first accelerator, else the cpu). Modules are
    offloaded when they map to disk, or to cpu while the main device is an accelerator other
    than mps; an offloaded module runs on the main device, its weights streamed in. Dispatch
    happens when the map has several devices or disk; a single-device load keeps everything
    where it is. (accelerate 1.15 `big_modeling.dispatch_model`: the main device is the map's
    first accelerator in the map's order; `hooks.AlignDevicesHook.init_hook`.)
    """

    def __init__(self, device_map: Mapping[str, str]):
        self.map = device_map
        used = list(dict.fromkeys(device_map.values()))
        self.main = None
        self.offloaded: set[str] = set()
        if len(used) > 1 or "disk" in used:
            found = [device for device in used if is_accelerator(device)]
            self.main = found[0] if found else "cpu"
            self.offloaded = {"disk"} if self.main == "cpu" or self.main.startswith("mps") else {"cpu", "disk"}

    def device(self, name: str, is_buffer: bool) -> str | None:
        """Where the tensor `name` is kept (None: the map does not cover it)."""
        device = device_of(name, self.map)
        if is_buffer and device in self.offloaded:
            return self.main
        return device

    def is_offloaded(self, name: str) -> bool:
        """Are the module `name`'s weights streamed in for each call (kept on cpu or disk)?"""
        return device_of(name, self.map) in self.offloaded

    def runs_on(self, name: str) -> str | None:
        """The device the module `name` computes on."""
        return self.main if self.is_offloaded(name) else device_of(name, self.map)


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
