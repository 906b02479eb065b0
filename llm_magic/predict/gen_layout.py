"""Where each part of one `generate` call runs, read from a loaded model or from a predicted device map.

What the simulation needs to know about the real model, and nothing that holds it:
- the decoder layers, grouped into kinds (same cache type, same class, same parameter shapes):
  layers of one kind are identical, so one of each is simulated and the rest are arithmetic;
- each layer's execution device (accelerate's hook decides: a layer mapped to cpu or disk in a
  model with an accelerator runs on the accelerator, its weights streamed in for each call),
  and the most bytes of weights copied in for it at once (one submodule's: see `_streamed_bytes`);
- the main device (inputs, masks, rotary tables: where the embedding runs) and the head's device;
- the weights resident on each device, the dtypes, the attention implementation and the
  context window.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llm_magic.compat import transformers as tf
from llm_magic.compat.accelerate import (
    find_offloaded,
    loads_submodules,
    module_hooks,
    offload_weights_map,
)
from llm_magic.measure.layer_types import (
    decoder_layer_types,
    has_sliding_layers,
    text_config,
)
from llm_magic.measure.model_devices import (
    decoder_layers,
    execution_device,
    model_device,
    model_dtype,
)
from llm_magic.names import (
    dtype_name,
    normalize_device,
    normalize_device_map,
)
from llm_magic.predict.checkpoint import SAFETENSORS_TO_TORCH, read_safetensors_header
from llm_magic.predict.sizing import Dispatch

# Attention implementations simulated as they are; the others run as sdpa, whose memory (output
# and log-sum-exp, no score matrix) is what the fused kernels (flash attention 2/3) hold too.
SIMULATED_ATTENTION = ("eager", "sdpa")
CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


@dataclass(frozen=True)
class GenLayout:
    model_class: type
    config: Any  # the model's own config (read, never changed)
    dtype: Any  # torch dtype of the activations
    attention: str  # the implementation the replica runs: "eager" or "sdpa"
    attention_model: str  # the implementation the model uses ("flash_attention_2", ...)
    layer_path: str  # "model.layers": where the decoder layers are
    layer_devices: tuple[str, ...]  # execution device of each decoder layer
    layer_kinds: tuple[int, ...]  # the kind of each layer (an index into kind_shapes)
    picks: tuple[int, ...]  # the replica's layers: the first two, and the first of each kind
    kind_shapes: tuple[tuple, ...]  # per kind: (class name, ((parameter, shape), ...)) to check a replica
    streamed_bytes: tuple[int, ...]  # per layer: most offloaded weight bytes copied to its device at once
    streamed_other: dict[str, int]  # "embedding", "head": likewise
    main_device: str
    head_device: str
    weights_by_device: dict[str, int]  # bytes resident now (or, for a meta model, once loaded)
    context_window: int | None
    param_dtypes: dict[str, Any] = field(default_factory=dict)  # qualified name -> dtype
    generation_config: Any = None  # the model's: cache implementation, sampling
    sliding: bool = False  # some layers keep a window (or chunk) of the cache, not all of it
    windows: tuple[int, ...] = ()  # their windows (chunks), in tokens
    notes: tuple[str, ...] = ()

    @property
    def devices(self) -> tuple[str, ...]:
        """Devices the generation touches, main first."""
        return tuple(dict.fromkeys((self.main_device, *self.layer_devices, self.head_device)))


def layout_signature(layout: GenLayout) -> tuple:
    """What makes two layouts simulate alike, as plain comparable values.

    The config by its JSON text (a config that cannot say is unique: never matched); dtypes and
    classes by name; dicts as sorted pairs.
    """
    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return tuple(sorted((str(key), plain(item)) for key, item in value.items()))
        if isinstance(value, (tuple, list)):
            return tuple(plain(item) for item in value)
        if isinstance(value, type):
            return f"{value.__module__}.{value.__qualname__}"
        if value is None or isinstance(value, (str, int, float, bool)):
            return value
        to_json = getattr(value, "to_json_string", None)
        if callable(to_json):
            try:
                return to_json(use_diff=False)
            except Exception:  # noqa: BLE001 - an odd config: never equal to another
                return ("unique", id(value))
        return str(value)  # torch dtypes: "torch.bfloat16"

    return tuple((name, plain(getattr(layout, name))) for name in layout.__dataclass_fields__ if name != "notes")


def context_window(config: Any) -> int | None:
    text = text_config(config)
    for name in CONTEXT_FIELDS:
        value = getattr(text, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def is_generative_decoder(model: Any) -> bool:
    """A decoder-only model that can generate (no BERT, no sentence-transformers, no encoder-decoder)."""
    config = getattr(model, "config", None)
    can_generate = getattr(model, "can_generate", None)
    try:
        generates = bool(can_generate()) if callable(can_generate) else False
    except Exception:  # noqa: BLE001 - a model that cannot say: not a generator
        generates = False
    return generates and config is not None and not getattr(config, "is_encoder_decoder", False)


def unwrap(model: Any) -> Any:
    """The transformers model inside a PEFT wrapper; the model itself otherwise."""
    getter = getattr(model, "get_base_model", None)
    if callable(getter) and type(model).__name__.startswith("Peft"):
        try:
            return getter()
        except Exception:  # noqa: BLE001
            return model
    return model


def layout_of_loaded(model: Any) -> GenLayout:
    """The layout of a loaded (possibly dispatched, offloaded or split) model."""
    layers, path = decoder_layers_and_path(model)
    devices, streamed = [], []
    for layer in layers:
        devices.append(execution_device(layer) or "cpu")
        streamed.append(_streamed_bytes(layer, devices[-1]))
    main = model_device(model) or devices[0]
    head = _head_device(model) or devices[-1]
    ends = {"embedding": model.get_input_embeddings(), "head": model.get_output_embeddings()}
    other = {key: _streamed_bytes(module, execution_device(module) or main) for key, module in ends.items() if module is not None}
    weights: dict[str, int] = {}
    for parameter in (*model.parameters(), *model.buffers()):
        if parameter.device.type != "meta":
            device = normalize_device(parameter.device)
            weights[device] = weights.get(device, 0) + parameter.numel() * parameter.element_size()
    return _layout(model, layers, path, devices, streamed, main, head, weights, other)


def layout_of_meta(model: Any, device_map: dict[str, Any] | None) -> GenLayout:
    """The layout a meta model (built from a config) will have once loaded with `device_map`.

    accelerate's rule (dispatch_model, `predict.sizing.Dispatch`): modules kept on the cpu or the
    disk while the main device is an accelerator run on it, their weights streamed in; without
    one, everything runs on the cpu.
    """
    dispatch = Dispatch(normalize_device_map(device_map or {"": "cpu"}))

    def runs_on(name: str) -> str:
        return dispatch.runs_on(name) or "cpu"

    layers, path = decoder_layers_and_path(model)
    devices, streamed = [], []
    for index, layer in enumerate(layers):
        name = f"{path}.{index}"
        devices.append(runs_on(name))
        streamed.append(_largest_module_bytes(layer) if dispatch.is_offloaded(name) else 0)
    weights: dict[str, int] = {}
    tensors = [(name, tensor, False) for name, tensor in model.named_parameters()]
    tensors += [(name, tensor, True) for name, tensor in model.named_buffers()]
    for name, tensor, is_buffer in tensors:
        device = dispatch.device(name, is_buffer) or "cpu"
        weights[device] = weights.get(device, 0) + tensor.numel() * tensor.element_size()
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    names = {id(module): name for name, module in model.named_modules()}
    main = runs_on(names.get(id(embedding), "")) if embedding is not None else devices[0]
    head_device = runs_on(names.get(id(head), "")) if head is not None else devices[-1]
    other = {key: _largest_module_bytes(module) for key, module in (("embedding", embedding), ("head", head))
             if module is not None and dispatch.is_offloaded(names.get(id(module), ""))}
    return _layout(model, layers, path, devices, streamed, main, head_device, weights, other)


def _layout(model, layers, path, devices, streamed, main, head, weights, other) -> GenLayout:
    config = model.config
    notes: list[str] = []
    kinds, picks, shapes = _kinds(model, layers)
    attention_model = tf.attention_implementation(config) or "sdpa"
    attention = attention_model if attention_model in SIMULATED_ATTENTION else "sdpa"
    if attention != attention_model:
        notes.append(f"{attention_model} simulated as sdpa (the same memory: no score matrix)")
    if getattr(model, "hf_quantizer", None) is not None or getattr(config, "quantization_config", None):
        notes.append("quantized weights: activations simulated in the compute dtype; dequantization buffers not counted")
    dtype = model_dtype(model)
    return GenLayout(
        model_class=type(model),
        config=config,
        dtype=dtype,
        attention=attention,
        attention_model=attention_model,
        layer_path=path,
        layer_devices=tuple(devices),
        layer_kinds=tuple(kinds),
        picks=tuple(picks),
        kind_shapes=tuple(shapes),
        streamed_bytes=tuple(streamed),
        streamed_other=other,
        main_device=main,
        head_device=head,
        weights_by_device=weights,
        context_window=context_window(config),
        param_dtypes={name: t.dtype for name, t in (*model.named_parameters(), *model.named_buffers())},
        generation_config=getattr(model, "generation_config", None),
        sliding=has_sliding_layers(config),
        windows=_windows(config),
        notes=tuple(notes),
    )


def _windows(config: Any) -> tuple[int, ...]:
    from llm_magic.measure.kvcache import kv_cache_profile

    try:
        profile = kv_cache_profile(config, "float32")
    except Exception:  # noqa: BLE001 - an odd config: no window known
        return ()
    return tuple(sorted({layer.window for layer in profile.layers if layer.window}))


def decoder_layers_and_path(model: Any):
    count = getattr(text_config(model.config), "num_hidden_layers", None)
    layers = decoder_layers(model, int(count)) if count else None
    if layers is None:
        raise LookupError("the decoder layers were not found among the model's modules")
    path = next(name for name, module in model.named_modules() if module is layers)
    return layers, path


def layer_shapes(layer: Any) -> tuple:
    """(class name, ((parameter, shape), ...)): what makes two decoder layers the same module."""
    return type(layer).__name__, tuple((name, tuple(p.shape)) for name, p in layer.named_parameters())


def _kinds(model: Any, layers) -> tuple[list[int], list[int], list[tuple]]:
    """Group identical layers: same cache type, class, parameter names, shapes and dtypes."""
    types = decoder_layer_types(model.config)
    kinds, picks, shapes, keys = [], [], [], {}
    for index, layer in enumerate(layers):
        shape = layer_shapes(layer)
        dtypes = tuple(str(p.dtype) for p in layer.parameters())
        key = (types[index] if index < len(types) else None, shape, dtypes)
        if key not in keys:
            keys[key] = len(picks)
            picks.append(index)
            shapes.append(shape)
        kinds.append(keys[key])
    # The second layer too: only from it on is the steady state seen (some models keep the
    # embedding output alive for the whole forward, besides the hidden states).
    picks = sorted({*picks, *range(min(2, len(layers)))})
    return kinds, picks, shapes


def _streamed_bytes(module: Any, device: str) -> int:
    """The most bytes of offloaded weights copied onto `device` at once while `module` runs.

    accelerate puts an offloading hook on each submodule that has weights: it loads that
    submodule's weights before its forward and sets them back to meta after it (AlignDevicesHook
    `pre_forward` / `post_forward`; measured on the cpu: each is freed before the next loads). So
    one submodule's weights are there at a time, and the largest is what a peak can include. A
    weight used in place costs nothing: a tensor already in RAM when the module runs on the cpu,
    or a safetensors file read on the cpu in its stored dtype (`safe_open` maps the file; the
    tensor is file pages, not allocated memory).
    """
    largest, headers = 0, {}
    for submodule in module.modules():
        for hook in module_hooks(submodule):
            weights_map = offload_weights_map(hook)
            if weights_map is None:
                continue
            weights = submodule.named_parameters(recurse=loads_submodules(hook))
            copied = sum(_copied_bytes(weights_map, name, weight, device, headers) for name, weight in weights
                         if weight.device.type == "meta")
            largest = max(largest, copied)
    return largest


def _copied_bytes(weights_map: Any, name: str, weight: Any, device: str, headers: dict) -> int:
    """Bytes the hook allocates on `device` to bring offloaded `weight` in (0: used in place)."""
    size = weight.numel() * weight.element_size()
    found = find_offloaded(weights_map, name) if device == "cpu" else None
    if found is None:  # onto an accelerator, or not found: a copy
        return size
    if found.tensor is not None:
        return 0 if found.tensor.dtype == weight.dtype else size
    entry = found.index_entry or {}
    path = entry.get("safetensors_file")
    if not isinstance(path, str):  # accelerate's own .dat files: read into a new tensor
        return size
    if path not in headers:
        try:
            headers[path] = read_safetensors_header(path)
        except (OSError, ValueError):
            headers[path] = {}
    stored = (headers[path].get(entry.get("weight_name", found.key)) or {}).get("dtype")
    return 0 if SAFETENSORS_TO_TORCH.get(stored) == dtype_name(weight.dtype) else size


def _largest_module_bytes(module: Any) -> int:
    """The weights of the largest submodule (its own, not its children's): what one hook streams in."""
    return max((sum(p.numel() * p.element_size() for p in sub.parameters(recurse=False)) for sub in module.modules()),
               default=0)


def _head_device(model: Any) -> str | None:
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    return execution_device(head) if head is not None else None
