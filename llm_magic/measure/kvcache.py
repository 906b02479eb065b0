"""How many bytes of KV cache one generated token costs, from a transformers config.

This models the cache that `generate()` and a plain `model(..., use_cache=True)` build by
default: a `DynamicCache(config=...)`. Checked against real caches with transformers 4.57 and
5.23 (`cache_utils.DynamicLayer` / `DynamicSlidingWindowLayer`; MLA in
`models/deepseek_v3/modeling_deepseek_v3.py`):

- A full-attention layer keeps K and V for every token: `2 * kv_heads * head_dim * dtype bytes`
  per token and sequence.
- A sliding-window (or chunked) layer keeps the last `window - 1` tokens, but as a view into the
  tensor it concatenated one step earlier, so while decoding it holds `window` tokens of memory
  (a static cache's sliding layer holds exactly `window` too). Right after a prefill of `n`
  tokens it still holds all `n` until the next step: see `prefill=` below.
- MLA (DeepSeek V2/V3 and relatives): transformers 5 caches the compressed latent
  (`kv_lora_rank + qk_rope_head_dim` per layer and token, one "head"); 4.x caches the expanded
  per-head K (`qk_nope + qk_rope`) and V (`v_head_dim`). Which one applies is read from the
  installed modeling code, not guessed from the version.
- Recurrent layers (mamba, linear attention, conv) keep a fixed-size state per sequence,
  nothing per token; layers that reuse another layer's cache keep nothing.

Pure logic: torch and transformers are imported only inside functions; results are frozen
dataclasses with `to_dict()`. A figure that cannot be known is a note, not an exception.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from llm_magic import names
from llm_magic.compat import transformers as tf
from llm_magic.compat.transformers import mla_caches_latent
from llm_magic.measure.layer_types import (
    FULL,
    FULL_TYPES,
    HYBRID_TYPES,
    NO_CACHE_TYPES,
    NONE,
    RECURRENT_TYPES,
    SLIDING,
    SLIDING_TYPES,
    cache_layer_types,
    config_value,
    per_layer_configs,
    text_config,
)


@dataclass(frozen=True)
class LayerKV:
    """What one decoder layer caches per token of one sequence."""

    index: int
    layer_type: str  # as the config names it: "full_attention", "sliding_attention", ...
    kind: str  # FULL, SLIDING or NONE
    bytes_per_token: int  # bytes, one sequence; 0 for NONE
    window: int | None  # sliding window / attention chunk from the config; None if unbounded
    max_tokens: int | None  # most tokens of memory held while decoding (window); None: no cap
    formula: str  # how bytes_per_token was computed, for people

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class KVProfile:
    """KV cache cost of a model per token, for one sequence (multiply by the batch)."""

    model_type: str
    dtype: str  # "bfloat16", ...
    dtype_bytes: int  # bytes per element
    bytes_per_token: int  # bytes per token, one sequence, summed over the uncapped layers
    sliding_bytes_per_token: int  # bytes per token, one sequence, over the capped layers
    sliding_cap_bytes: int  # bytes, one sequence: the most the capped layers hold
    layers: tuple[LayerKV, ...]
    notes: tuple[str, ...]

    @property
    def unbounded(self) -> bool:
        """Does the cache keep growing with every token?"""
        return self.bytes_per_token > 0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["layers"] = [layer.to_dict() for layer in self.layers]
        data["notes"] = list(self.notes)
        return data


def cache_dtype(dtype: Any, config: Any = None) -> tuple[str, int, str | None]:
    """(name, bytes per element, note) for a torch dtype, its name, or "auto" (the config's)."""
    import torch

    note = None
    if dtype is None or (isinstance(dtype, str) and dtype == "auto"):
        found = None
        for source in (text_config(config), config) if config is not None else ():
            found = config_value(source, "dtype")
            if found is None and not hasattr(source, "dtype"):
                found = config_value(source, "torch_dtype")  # transformers before 4.56
            if found is not None:
                break
        if found is None or found == "auto":
            found = "float32"
            note = "the config names no dtype: assumed float32 (pass the loaded model's dtype)"
        dtype = found
    if isinstance(dtype, str):
        dtype = names.parse_dtype(dtype)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, a dtype name or 'auto', not {type(dtype).__name__}")
    return names.dtype_name(dtype), dtype.itemsize, note


def _attention_bytes(layer: Any, model_type: str, dtype_bytes: int, notes: list[str]) -> tuple[int, str]:
    """(bytes per token, formula) of one attention layer's K and V, one sequence."""
    heads = config_value(layer, "num_attention_heads")
    kv_lora_rank = config_value(layer, "kv_lora_rank")
    if kv_lora_rank:
        # MLA. Checked before `head_dim`: DeepseekV3Config sets head_dim = qk_rope_head_dim.
        rope = int(config_value(layer, "qk_rope_head_dim", 0))
        latent = mla_caches_latent(model_type)
        if latent is None:
            latent = tf.major() >= 5
            notes.append(
                f"could not read how {model_type!r} caches MLA; assumed "
                + ("the compressed latent (transformers 5)" if latent else "expanded K/V (transformers 4)")
            )
        if latent:
            size = (int(kv_lora_rank) + rope) * dtype_bytes
            return size, f"MLA latent ({kv_lora_rank} + {rope}) x {dtype_bytes} B"
        nope = int(config_value(layer, "qk_nope_head_dim", 0))
        v_dim = int(config_value(layer, "v_head_dim", 0))
        if not heads:
            notes.append("MLA config without num_attention_heads: its cache size is unknown")
            return 0, "unknown"
        size = int(heads) * (nope + rope + v_dim) * dtype_bytes
        return size, f"MLA expanded {heads} heads x (K {nope}+{rope} + V {v_dim}) x {dtype_bytes} B"

    if not heads:
        notes.append("config has no num_attention_heads: attention cache size unknown")
        return 0, "unknown"
    heads = int(heads)
    kv_heads = config_value(layer, "num_key_value_heads") or config_value(layer, "num_kv_heads")
    if not kv_heads and config_value(layer, "multi_query", False):
        kv_heads = 1
    kv_heads = int(kv_heads or heads)
    head_dim = config_value(layer, "head_dim")
    if not head_dim:
        hidden = config_value(layer, "hidden_size")
        if not hidden:
            notes.append("config has neither head_dim nor hidden_size: attention cache size unknown")
            return 0, "unknown"
        head_dim = int(hidden) // heads
    head_dim = int(head_dim)
    size = 2 * kv_heads * head_dim * dtype_bytes
    return size, f"K+V 2 x {kv_heads} kv heads x {head_dim} x {dtype_bytes} B"


def kv_cache_profile(config: Any, dtype: Any = "auto") -> KVProfile:
    """KV cache bytes per token of the model `config` describes, with its cache in `dtype`.

    `dtype`: a torch dtype, its name ("bfloat16"), or "auto" for the config's dtype. Pass the
    loaded model's dtype when there is one: transformers 4.x loads a bf16 checkpoint as float32
    unless told otherwise, and then its cache is float32 too.
    """
    # One pass over the layers, long because each family's cache rule is a branch of it (full,
    # sliding, MLA latent, recurrent); split, the branches would pass six values back and forth.
    notes: list[str] = []
    text = text_config(config)
    model_type = str(config_value(text, "model_type", "") or config_value(config, "model_type", "") or "unknown")
    dtype_name, dtype_bytes, dtype_note = cache_dtype(dtype, config)
    if dtype_note:
        notes.append(dtype_note)

    count = config_value(text, "num_hidden_layers")
    declared = config_value(text, "layer_types") or config_value(text, "layers_block_type")
    if not count and declared:
        count = len(declared)
    if not count:
        notes.append("config has no num_hidden_layers: KV cache size unknown")
        return KVProfile(model_type, dtype_name, dtype_bytes, 0, 0, 0, (), tuple(notes))
    count = int(count)

    layer_types = cache_layer_types(text, count, model_type, notes)
    layer_configs = per_layer_configs(text, len(layer_types))
    unknown: set[str] = set()
    recurrent = 0
    layers: list[LayerKV] = []
    for index, (layer_type, layer) in enumerate(zip(layer_types, layer_configs)):
        if layer_type in RECURRENT_TYPES:
            recurrent += 1
        if layer_type in NO_CACHE_TYPES:
            layers.append(LayerKV(index, layer_type, NONE, 0, None, None, "nothing per token"))
            continue
        if layer_type in SLIDING_TYPES or HYBRID_TYPES.get(layer_type) == SLIDING:
            kind = SLIDING
        elif layer_type in FULL_TYPES or layer_type in HYBRID_TYPES:
            kind = FULL
        else:
            # indexed_attention, compressed_sparse_attention, ...: at least a full K/V cache.
            kind = FULL
            unknown.add(layer_type)
        size, formula = _attention_bytes(layer, model_type, dtype_bytes, notes)
        if layer_type == "indexed_attention":
            index_dim = config_value(layer, "index_head_dim")
            if index_dim:
                size += int(index_dim) * dtype_bytes
                formula += f" + indexer keys {index_dim} x {dtype_bytes} B"
        window = None
        if kind == SLIDING:
            window = config_value(layer, "attention_chunk_size" if layer_type == "chunked_attention" else "sliding_window")
            if window is None:
                window = config_value(layer, "sliding_window") or config_value(layer, "attention_chunk_size")
            if window is None:
                kind = FULL
                notes.append(f"layer {index} is {layer_type!r} but the config has no window: counted as full")
            else:
                window = int(window)
        layers.append(LayerKV(index, layer_type, kind, size, window, window, formula))

    # Notes are deduplicated, in order.
    notes = list(dict.fromkeys(notes))
    if unknown:
        notes.append(
            "layer types " + ", ".join(sorted(unknown)) + " are counted as full attention (an estimate; not checked)"
        )
        if "indexed_attention" in unknown:
            notes.append("indexed attention: indexer keys counted from index_head_dim (not checked)")
    if recurrent:
        notes.append(f"{recurrent} recurrent layer(s) keep a fixed-size state per sequence, not counted here")
    if config_value(text, "is_encoder_decoder", False):
        notes.append("encoder-decoder model: the cross-attention cache (encoder length) is not counted")
    if config_value(config, "auto_map"):
        notes.append("config has auto_map: with trust_remote_code the remote modeling code decides the cache layout")

    full = sum(layer.bytes_per_token for layer in layers if layer.kind == FULL)
    sliding = sum(layer.bytes_per_token for layer in layers if layer.kind == SLIDING)
    cap = sum(layer.bytes_per_token * layer.max_tokens for layer in layers if layer.kind == SLIDING)
    return KVProfile(model_type, dtype_name, dtype_bytes, full, sliding, cap, tuple(layers), tuple(notes))


# --------------------------------------------------------------------------- arithmetic


def _check(tokens: int, batch: int) -> None:
    if tokens < 0:
        raise ValueError(f"tokens must be >= 0, not {tokens}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, not {batch}")


def kv_cache_bytes(profile: KVProfile, tokens: int, batch: int = 1, *, prefill: bool = False) -> int:
    """Bytes the cache holds after `tokens` tokens per sequence, for `batch` sequences.

    Default: while decoding, sliding layers hold at most their window. `prefill=True`: right
    after one forward pass over all `tokens` (a prompt), when sliding layers still hold every
    token until the next step. Beam search: pass `batch * num_beams`.
    """
    tokens, batch = int(tokens), int(batch)
    _check(tokens, batch)
    per_sequence = 0
    for layer in profile.layers:
        held = tokens if (layer.max_tokens is None or prefill) else min(tokens, layer.max_tokens)
        per_sequence += layer.bytes_per_token * held
    return per_sequence * batch


def tokens_that_fit(profile: KVProfile, free_bytes: int, batch: int = 1, *, prefill: bool = False) -> int | None:
    """The most tokens per sequence whose cache fits in `free_bytes`; None if any number fits.

    None when nothing grows per token (recurrent models, or only sliding layers whose full
    windows fit). With `prefill=True`, the longest prompt whose cache fits right after its
    forward pass (sliding layers hold all of it then, so the answer is always finite unless
    nothing is cached). Activations and allocator overhead are not included.
    """
    batch = int(batch)
    _check(0, batch)
    free = max(int(free_bytes), 0)
    growing = profile.bytes_per_token + (profile.sliding_bytes_per_token if prefill else 0)
    if growing == 0:
        if profile.sliding_bytes_per_token == 0 or profile.sliding_cap_bytes * batch <= free:
            return None
        high = max(layer.max_tokens or 0 for layer in profile.layers)  # the cap is reached there
    else:
        high = free // (growing * batch)
    # kv_cache_bytes is non-decreasing in tokens: the largest t with bytes(t) <= free.
    low = 0
    while low < high:
        middle = (low + high + 1) // 2
        if kv_cache_bytes(profile, middle, batch, prefill=prefill) <= free:
            low = middle
        else:
            high = middle - 1
    return low
