"""Which decoder layers keep a KV cache, and of what kind, read from a transformers config as
`DynamicCache(config=...)` reads it (4.57 and 5.x alike).

Config reading only: kvcache.py turns these layer types into bytes per token, the generation
simulation (predict/gen_layout.py) into where each layer's cache grows. Nothing here imports
torch or transformers.
"""

from __future__ import annotations

from typing import Any

FULL = "full"  # grows with every token
SLIDING = "sliding"  # grows until its window is full
NONE = "none"  # nothing per token

# Layer type names (config `layer_types`, 4.x hybrids' `layers_block_type`) by what they cache.
FULL_TYPES = {"full_attention", "attention", "global_attention"}
SLIDING_TYPES = {"sliding_attention", "chunked_attention", "local_attention"}
# Attention plus a fixed-size recurrent state (zamba, falcon_h1, zaya1).
HYBRID_TYPES = {"hybrid": FULL, "hybrid_sliding": SLIDING}
NO_CACHE_TYPES = {"linear_attention", "mamba", "conv", "moe", "mlp", "dummy"}
RECURRENT_TYPES = {"linear_attention", "mamba", "conv", "hybrid", "hybrid_sliding"}
# Families with no attention at all and (in 4.x) no `layer_types` to say so.
RECURRENT_MODEL_TYPES = {"mamba", "mamba2", "falcon_mamba", "rwkv", "xlstm"}


def config_value(config: Any, name: str, default: Any = None) -> Any:
    """`getattr` that also survives transformers 5's heterogeneous configs, which raise a
    RuntimeError for a per-layer attribute read on the global config."""
    try:
        value = getattr(config, name)
    except Exception:
        return default
    return default if value is None else value


def text_config(config: Any) -> Any:
    """The decoder's text config of a (possibly multimodal) config."""
    getter = getattr(config, "get_text_config", None)
    if callable(getter):
        try:
            return getter(decoder=True)
        except TypeError:  # older signature without `decoder`
            return getter()
        except ValueError:  # ambiguous: several text configs
            pass
    return config_value(config, "text_config", config)


def per_layer_configs(text: Any, count: int) -> list[Any]:
    """One config per layer: transformers 5's heterogeneous configs differ per layer."""
    if config_value(text, "is_heterogeneous", False):
        try:
            layers = list(text.per_layer_config)
        except Exception:
            layers = []
        if len(layers) >= count:
            return layers
    return [text] * count


def cache_layer_types(text: Any, count: int, model_type: str, notes: list[str]) -> list[str]:
    """Layer types as `DynamicCache(config=...)` derives them, in 4.57 and 5.x alike."""
    layer_types = config_value(text, "layer_types") or config_value(text, "layers_block_type")
    if layer_types:
        layer_types = [str(kind) for kind in layer_types]
    elif model_type in RECURRENT_MODEL_TYPES:
        layer_types = ["mamba"] * count
    else:
        # transformers' rule: all layers slide when the config has a window, else chunked
        # when it has a chunk size, else full. (Families with an opt-in, like Qwen2's
        # `use_sliding_window`, clear `sliding_window` themselves when it is off.)
        layer_types = []
        for layer in per_layer_configs(text, count):
            if config_value(layer, "sliding_window") is not None:
                layer_types.append("sliding_attention")
            elif config_value(layer, "attention_chunk_size") is not None:
                layer_types.append("chunked_attention")
            else:
                layer_types.append("full_attention")

    # Layers that read another layer's cache keep none of their own (Gemma 3n): 5.x marks
    # them in `kv_sharing_modes`, 4.x drops the last `num_kv_shared_layers` from the cache.
    modes = config_value(text, "kv_sharing_modes")
    shared = config_value(text, "num_kv_shared_layers", 0)
    before = list(layer_types)
    if modes:
        layer_types = ["dummy" if mode == "reuse" else kind for kind, mode in zip(layer_types, modes)]
    elif isinstance(shared, int) and 0 < shared <= len(layer_types):
        layer_types = layer_types[:-shared] + ["dummy"] * shared
    if layer_types != before:
        notes.append("layers that reuse another layer's KV cache are counted as caching nothing")
    return layer_types


def decoder_layer_types(config: Any) -> list[str]:
    """Each decoder layer's type as the cache sees it ("full_attention", "sliding_attention", "dummy", ...)."""
    text = text_config(config)
    model_type = str(config_value(text, "model_type", "") or config_value(config, "model_type", "") or "unknown")
    declared = config_value(text, "layer_types") or config_value(text, "layers_block_type")
    count = config_value(text, "num_hidden_layers") or (len(declared) if declared else 0)
    return cache_layer_types(text, int(count), model_type, []) if count else []


def has_sliding_layers(config: Any) -> bool:
    """Do some decoder layers keep only a window (or chunk) of the cache?"""
    return any(kind in SLIDING_TYPES or HYBRID_TYPES.get(kind) == SLIDING for kind in decoder_layer_types(config))
