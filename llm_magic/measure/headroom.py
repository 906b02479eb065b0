"""How many tokens of KV cache a loaded model can still generate into, with the memory there is now.

`generate()` keeps each attention layer's keys and values on that layer's execution device: the
device accelerate's hook runs it on (a dispatched model, weights possibly offloaded to cpu or
disk), else the device its weights are on. So the cache can be split across devices, and the
device that fills first bounds the length. Per token the cost is `kvcache.kv_cache_profile` of
the model's config in the model's real dtype (transformers 4.x loads a bf16 checkpoint as
float32, and its cache is float32 too); the free memory is a `memory.MemorySnapshot`'s: driver
free plus PyTorch's unused cache on a GPU, available RAM on the cpu.

Pure: no IPython; torch is reached only through the model given. Activations and allocator
slack are not counted: the figures are upper bounds on the cache alone, a fact about the cache
and not a promise. The line users see (`generation`, filled by predict/gen_headroom.py) is the
simulated peak of a whole `generate` call, activations included, capped at the context window.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from llm_magic import names
from llm_magic.measure.kvcache import (
    KVProfile,
    kv_cache_profile,
    tokens_that_fit,
)
from llm_magic.measure.layer_types import NONE, SLIDING
from llm_magic.measure.memory import MemorySnapshot
from llm_magic.measure.model_devices import (
    decoder_layers,
    execution_device,
    model_device,
    model_dtype,
)
from llm_magic.units import format_bytes


@dataclass(frozen=True)
class Fit:
    """How many tokens per sequence the cache can grow to at one batch size."""

    batch: int
    tokens: int | None  # None: unknown (see notes), or no limit when `unlimited`
    unlimited: bool = False  # the cache stops growing (sliding windows) before memory runs out

    def to_dict(self) -> dict[str, Any]:
        return {"batch": self.batch, "tokens": self.tokens, "unlimited": self.unlimited}


@dataclass(frozen=True)
class CacheDevice:
    """The part of the KV cache that lands on one device."""

    device: str  # "cuda:0", "cpu"
    layers: int  # attention layers whose cache is kept here
    bytes_per_token: int  # bytes per token and sequence, layers that grow without bound
    sliding_bytes_per_token: int  # bytes per token and sequence, sliding layers (until their window)
    free_bytes: int | None  # bytes free on the device now; None unknown
    fits: tuple[Fit, ...]  # batch 1, then the batch asked for

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "layers": self.layers,
            "bytes_per_token": self.bytes_per_token,
            "sliding_bytes_per_token": self.sliding_bytes_per_token,
            "free_bytes": self.free_bytes,
            "fits": [fit.to_dict() for fit in self.fits],
        }


@dataclass(frozen=True)
class Headroom:
    """Room left for generation: KV cache cost per token, where it goes, and how many tokens fit."""

    name: str
    device: str | None  # where the cache goes (the device holding most of it); None unknown
    dtype: str | None  # dtype of the cache ("bfloat16")
    bytes_per_token: int | None  # bytes per token and sequence, all layers that grow without bound
    sliding_bytes_per_token: int | None  # bytes per token and sequence of sliding layers (until full)
    devices: tuple[CacheDevice, ...]  # one per device the cache is split over, most layers first
    batch: int
    fits: tuple[Fit, ...]  # whole model: batch 1, then `batch` (the device that fills first decides)
    summary: str
    notes: tuple[str, ...] = ()
    generation: Any = None  # predict.gen_headroom.GenerationHeadroom: what one generate call can take

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "device": self.device,
            "dtype": self.dtype,
            "bytes_per_token": self.bytes_per_token,
            "sliding_bytes_per_token": self.sliding_bytes_per_token,
            "devices": [device.to_dict() for device in self.devices],
            "batch": self.batch,
            "fits": [fit.to_dict() for fit in self.fits],
            "summary": self.summary,
            "notes": list(self.notes),
            "generation": None if self.generation is None else self.generation.to_dict(),
        }

    def __str__(self) -> str:
        return self.summary

    @property
    def line(self) -> str:
        """What users see: the generation line, else the cache's cost per token (no token count:
        the cache alone says nothing about what fits)."""
        if self.generation is not None:
            return self.generation.line
        cost = f"{format_bytes(self.bytes_per_token)} per token" if self.bytes_per_token else "unknown"
        return f"Generation headroom of {self.name}: unknown; KV cache {cost}"


def generation_headroom(model: Any, name: str, snapshot: MemorySnapshot, *, batch: int = 1) -> Headroom:
    """The KV cache headroom of `model` (named `name`) given the free memory in `snapshot`.

    `batch`: a batch size to report besides 1 (beam search: batch x beams). A figure that cannot
    be known (no config, no attention fields, free memory not measured) is None with a note.
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, not {batch}")
    batches = (1,) if batch == 1 else (1, batch)
    notes: list[str] = []
    dtype = model_dtype(model)
    profile = _profile(model, dtype, notes)
    dtype_name = profile.dtype if profile is not None else (None if dtype is None else names.dtype_name(dtype))
    growing = [layer for layer in profile.layers if layer.kind != NONE] if profile is not None else []
    if profile is not None and profile.layers and not growing:
        # Recurrent layers only (mamba...): a fixed state per sequence, nothing per token.
        notes.extend(profile.notes)
        return Headroom(name, model_device(model), dtype_name, 0, 0, (), batch,
                        tuple(Fit(b, None, unlimited=True) for b in batches),
                        "no per-token KV cache: no token limit", tuple(notes))
    if profile is None or not any(layer.bytes_per_token for layer in growing):
        if profile is not None:
            notes.extend(profile.notes)
        reason = notes[0] if notes else "unknown"
        return Headroom(name, None, dtype_name, None, None, (), batch, tuple(Fit(b, None) for b in batches),
                        f"KV cache per token unknown ({reason})", tuple(dict.fromkeys(notes)))

    layer_devices = _layer_devices(model, len(profile.layers), [layer.index for layer in growing], notes)
    by_device: dict[str | None, list] = {}
    for layer, device in zip(growing, layer_devices):
        by_device.setdefault(device, []).append(layer)
    if None in by_device:
        notes.append(f"{len(by_device[None])} attention layer(s) on no known device: tokens that fit unknown")
    parts = []
    for device, layers in sorted(by_device.items(), key=lambda item: -len(item[1])):
        if device is None:
            continue
        sub = _subprofile(profile, layers)
        free = _free_bytes(device, snapshot, notes)
        fits = tuple(_fit(sub, free, b) for b in batches)
        parts.append(CacheDevice(device, len(layers), sub.bytes_per_token, sub.sliding_bytes_per_token, free, fits))
    if len(parts) > 1:
        notes.append("the KV cache is split: each attention layer keeps its cache on its execution device")
    known_devices = None not in by_device
    fits = tuple(_overall(parts, b, known_devices) for b in batches)
    main = max(parts, key=lambda part: part.bytes_per_token + part.sliding_bytes_per_token).device if parts else None
    notes.extend(profile.notes)
    headroom = Headroom(
        name=name,
        device=main,
        dtype=profile.dtype,
        bytes_per_token=profile.bytes_per_token,
        sliding_bytes_per_token=profile.sliding_bytes_per_token,
        devices=tuple(parts),
        batch=batch,
        fits=fits,
        summary="",
        notes=tuple(dict.fromkeys(notes)),
    )
    return replace(headroom, summary=_summary(headroom, profile))


# --------------------------------------------------------------------------- the model


def _profile(model: Any, dtype: Any, notes: list[str]) -> KVProfile | None:
    config = getattr(model, "config", None)
    if config is None:
        notes.append("the model has no config")
        return None
    if dtype is None:
        notes.append("the model's dtype is unknown: the config's dtype is used")
    try:
        profile = kv_cache_profile(config, "auto" if dtype is None else dtype)
    except Exception as error:  # noqa: BLE001 - an odd config: say so, do not break the report
        notes.append(f"KV cache per token unknown ({type(error).__name__}: {error})")
        return None
    if not profile.layers:
        notes.extend(profile.notes)
    return profile


def _layer_devices(model: Any, count: int, indices: list[int], notes: list[str]) -> list[str | None]:
    """The execution device of each decoder layer in `indices` (of `count`), or the model's device for all."""
    layers = decoder_layers(model, count)
    if layers is not None:
        return [execution_device(layers[index]) for index in indices]
    device = model_device(model)
    notes.append(f"decoder layers not found among the modules: the whole cache counted on {device or 'an unknown device'}")
    return [device] * len(indices)


# --------------------------------------------------------------------------- the arithmetic


def _subprofile(profile: KVProfile, layers: list) -> KVProfile:
    """The profile of some of the layers (those on one device), summed as kvcache sums them."""
    full = sum(layer.bytes_per_token for layer in layers if layer.kind != SLIDING)
    sliding = sum(layer.bytes_per_token for layer in layers if layer.kind == SLIDING)
    cap = sum(layer.bytes_per_token * layer.max_tokens for layer in layers if layer.kind == SLIDING)
    return replace(profile, bytes_per_token=full, sliding_bytes_per_token=sliding, sliding_cap_bytes=cap,
                   layers=tuple(layers), notes=())


def _free_bytes(device: str, snapshot: MemorySnapshot, notes: list[str]) -> int | None:
    free, why = snapshot.usable_free(device)
    if free is None:
        notes.append(f"free memory on {device} unknown ({why})")
    return free


def _fit(profile: KVProfile, free: int | None, batch: int) -> Fit:
    if free is None:
        return Fit(batch, None)
    tokens = tokens_that_fit(profile, free, batch)
    return Fit(batch, None, unlimited=True) if tokens is None else Fit(batch, tokens)


def _overall(parts: list[CacheDevice], batch: int, known_devices: bool) -> Fit:
    """The whole cache at `batch`: the device that fills first bounds it."""
    fits = [next(fit for fit in part.fits if fit.batch == batch) for part in parts]
    if not known_devices or not fits or any(fit.tokens is None and not fit.unlimited for fit in fits):
        return Fit(batch, None)
    bounded = [fit.tokens for fit in fits if not fit.unlimited]
    return Fit(batch, min(bounded)) if bounded else Fit(batch, None, unlimited=True)


# --------------------------------------------------------------------------- the sentence


def _summary(headroom: Headroom, profile: KVProfile) -> str:
    """'KV cache 128 KiB/token on cuda:0: ~61,000 tokens fit at batch 1, ~7,600 at batch 8'."""
    cost = f"KV cache {format_bytes(headroom.bytes_per_token)}/token"
    if headroom.sliding_bytes_per_token:
        windows = sorted({layer.max_tokens for layer in profile.layers if layer.kind == SLIDING})
        window = "/".join(f"{w:,}" for w in windows)
        if headroom.bytes_per_token:
            cost += f" (+{format_bytes(headroom.sliding_bytes_per_token)}/token up to the {window}-token window)"
        else:
            cost = (f"KV cache {format_bytes(headroom.sliding_bytes_per_token)}/token up to the "
                    f"{window}-token window")
    if len(headroom.devices) == 1:
        where = f" on {headroom.devices[0].device}"
    elif headroom.devices:
        where = " on " + " + ".join(f"{part.device} ({part.layers} layers)" for part in headroom.devices)
    else:
        where = " on an unknown device"
    phrases = []
    for fit in headroom.fits:
        if fit.unlimited:
            phrases.append(f"no token limit at batch {fit.batch}")
        elif fit.tokens is None:
            phrases.append(f"tokens that fit at batch {fit.batch} unknown")
        elif not phrases:
            phrases.append(f"~{_about(fit.tokens)} tokens fit at batch {fit.batch}")
        else:
            phrases.append(f"~{_about(fit.tokens)} at batch {fit.batch}")
    stops = " (the cache stops growing)" if any(fit.unlimited for fit in headroom.fits) else ""
    return f"{cost}{where}: " + ", ".join(phrases) + stops


def _about(tokens: int) -> str:
    """Two significant figures past 100 ("61,000"); the memory figures are not finer than that."""
    if tokens < 100:
        return str(tokens)
    digits = len(str(tokens)) - 2
    return f"{round(tokens, -digits):,}"
