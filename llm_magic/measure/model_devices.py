"""Where a loaded model computes, and in which dtype: facts read from the model itself.

accelerate's hooks decide where a dispatched module runs (its weights may sit on the cpu or the
disk); an undispatched module runs where its first real tensor is. The KV-cache headroom
(headroom.py) and the generation simulation (predict/gen_layout.py) both need these answers, so
they are defined here once. Pure: torch is reached only through the model given.
"""

from __future__ import annotations

from typing import Any

from llm_magic import names
from llm_magic.compat.accelerate import execution_device as hook_execution_device
from llm_magic.compat.accelerate import module_hooks

# Names of module lists that are not the text decoder's layers, for models that hold several.
_NOT_DECODER = ("vision", "visual", "image", "audio", "encoder")


def model_dtype(model: Any):
    """The dtype activations (and so the cache) take: `model.dtype`, else the first float parameter's."""
    dtype = getattr(model, "dtype", None)
    if dtype is not None and getattr(dtype, "is_floating_point", False):
        return dtype
    parameters = getattr(model, "parameters", None)
    if callable(parameters):
        for parameter in parameters():
            if parameter.is_floating_point():
                return parameter.dtype
    return None


def decoder_layers(model: Any, count: int):
    """The module list of the text decoder's `count` layers: the first such list outside vision/audio towers."""
    named = getattr(model, "named_modules", None)
    if not callable(named):
        return None
    for path, module in named():  # outer lists first: model.layers before model.layers.1.mlp.experts
        if type(module).__name__ == "ModuleList" and len(module) == count:
            if not any(word in path for word in _NOT_DECODER):
                return module
    return None


def model_device(model: Any) -> str | None:
    """Where the model computes: its input embedding's execution device, else the model's."""
    getter = getattr(model, "get_input_embeddings", None)
    if callable(getter):
        try:
            embedding = getter()
        except Exception:  # noqa: BLE001 - not every model implements it
            embedding = None
        if embedding is not None:
            device = execution_device(embedding)
            if device is not None:
                return device
    return execution_device(model) if hasattr(model, "modules") else None


def accelerate_hooks(module: Any):
    """accelerate's hooks on `module` and inside it (a SequentialHook chains several)."""
    for sub in module.modules():
        yield from module_hooks(sub)


def execution_device(module: Any) -> str | None:
    """The accelerate hook's execution device on `module` or inside it, else where its first real tensor is."""
    for hook in accelerate_hooks(module):
        device = hook_execution_device(hook)
        if device is not None:
            return names.normalize_device(device)
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.device.type != "meta":
            return names.normalize_device(tensor.device)
    return None
