"""The one-line generation headroom of a model: after `%%llmload`, in a dry run, and after an OOM.

"fits: the full 8,192-token context at batch 4" or "prompts over 3,100 tokens (+256 new) will
run out of memory on cuda:0": from the simulated peak of `generate` (generation.py), capped at the
context window, activations included. Capacities are the memory free now on each device (driver
free plus PyTorch's unused cache; available RAM for the cpu), or a budget minus the weights.
Models that do not generate (BERT, sentence-transformers) get no line; a model the simulation
cannot run gets "unknown" and the reason, never an exception.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from llm_magic.names import dtype_name
from llm_magic.predict.gen_layout import (
    GenLayout,
    is_generative_decoder,
    layout_of_meta,
    unwrap,
)
from llm_magic.predict.generation import (
    GenerationPredictor,
    GenerationUnknown,
    Peaks,
    PromptLimit,
    missing_bytes,
    why,
)
from llm_magic.units import format_bytes

DEFAULT_NEW_TOKENS = 256


@dataclass(frozen=True)
class GenerationHeadroom:
    """What one generate call at `batch` can take on this model, in one line (`summary`)."""

    name: str
    batch: int
    new_tokens: int
    context_window: int | None
    max_prompt_tokens: int | None  # None: unknown
    whole_context: bool | None  # prompt + new tokens = the whole context window fits
    device: str | None  # the device that runs out first (None: none does, or unknown)
    peak_bytes: Peaks  # generation bytes (above the weights) at max_prompt_tokens
    capacity_bytes: Peaks  # bytes available for generation per device
    summary: str
    attention: str | None = None
    dtype: str | None = None  # of the activations ("bfloat16")
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "batch": self.batch,
            "new_tokens": self.new_tokens,
            "context_window": self.context_window,
            "max_prompt_tokens": self.max_prompt_tokens,
            "whole_context": self.whole_context,
            "device": self.device,
            "peak_bytes": dict(self.peak_bytes),
            "capacity_bytes": dict(self.capacity_bytes),
            "summary": self.summary,
            "attention": self.attention,
            "dtype": self.dtype,
            "notes": list(self.notes),
        }

    def __str__(self) -> str:
        return self.line

    @property
    def line(self) -> str:
        """'Generation headroom of model (bfloat16, sdpa): fits: the full 256-token context at batch 1'."""
        how = ", ".join(filter(None, (self.dtype, self.attention)))
        how = f" ({how})" if how else ""
        return f"Generation headroom of {self.name}{how}: {self.summary}"


def capacity_now(layout: GenLayout, snapshot: Any, notes: list[str], free: Peaks | None = None) -> Peaks:
    """Bytes each device can give generation now: its usable free memory (`free` overrides)."""
    capacity: Peaks = {}
    for device in layout.devices:
        room = (free or {}).get(device)
        if room is None:
            room, why = snapshot.usable_free(device) if snapshot is not None else (None, "not measured")
            if room is None:
                notes.append(f"free memory on {device} unknown ({why}): it is not checked")
                continue
        capacity[device] = room
    return capacity


def headroom(model: Any, name: str, snapshot: Any, *, batch: int = 1, new_tokens: int = DEFAULT_NEW_TOKENS,
             predictor: GenerationPredictor | None = None) -> GenerationHeadroom | None:
    """The headroom line of a loaded model; None for a model that does not generate text."""
    model = unwrap(model)
    if not is_generative_decoder(model):
        return None
    try:
        predictor = predictor or GenerationPredictor.for_model(model)
    except GenerationUnknown as error:
        return _unknown(name, batch, new_tokens, str(error))
    notes: list[str] = []
    return _line(predictor, name, batch, new_tokens, capacity_now(predictor.layout, snapshot, notes), notes)


def fit_line_for_meta_model(meta_model: Any, name: str, device_map: dict[str, Any] | None, free_bytes: Peaks,
                            weights_by_device: Peaks, *, batch: int = 1,
                            new_tokens: int = DEFAULT_NEW_TOKENS) -> GenerationHeadroom | None:
    """The headroom line for a model not loaded yet (`%%llmload --dry-run`).

    `meta_model`: the model built on the meta device from its config (as pre-flight builds it),
    `device_map`: the predicted placement (module -> device; None: all on the cpu), `free_bytes`:
    free memory per device before the load (after what the cell would release), `weights_by_device`:
    the predicted placement's bytes, taken out of it. (Those, not the meta model's parameters: the
    prediction counts tied weights once, float32 upcasts and quantized sizes as the load makes them.)
    """
    if not is_generative_decoder(meta_model):
        return None
    try:
        layout = layout_of_meta(meta_model, device_map)
        predictor = GenerationPredictor(layout)
    except Exception as error:  # noqa: BLE001 - never an exception out of a dry run
        return _unknown(name, batch, new_tokens, why(error))
    notes: list[str] = []
    capacity = {device: free_bytes[device] - weights_by_device.get(device, 0)
                for device in layout.devices if free_bytes.get(device) is not None}
    notes += [f"free memory on {device} unknown: it is not checked" for device in layout.devices if device not in capacity]
    return _line(predictor, name, batch, new_tokens, capacity, notes)


def _line(predictor: GenerationPredictor, name: str, batch: int, new_tokens: int, capacity: Peaks,
          notes: list[str]) -> GenerationHeadroom:
    """The whole context first (one simulation); the longest prompt only when it does not fit.

    With a short context window, the new tokens are capped at half of it (the demo model's 256
    tokens would otherwise leave no prompt at all)."""
    layout = predictor.layout
    context = layout.context_window
    new = min(new_tokens, max(1, context // 2)) if context else new_tokens
    notes = [*notes, *layout.notes]
    if context is None:
        notes.append("the config names no context window: prompts searched up to 1,048,576 tokens")
    try:
        # The longest prefill of any prompt + new tokens that fill the context: a prompt of
        # context - 1 tokens. A decoding step with that cache holds less than that prefill (the
        # same cache, one layer's K and V copied, versus every projection of the prompt); with
        # sliding layers the first step after it (they still hold the whole prompt) is run too.
        worst = predictor.peaks(batch, context - 1, 2 if layout.sliding else 1) if context and context > 2 else None
        whole = worst is not None and not missing_bytes(worst, capacity)
        limit = None if whole else predictor.largest_prompt(batch, new, capacity)
    except GenerationUnknown as error:
        return _unknown(name, batch, new, str(error), layout.attention_model)
    if whole:
        summary = f"fits: the full {context:,}-token context at batch {batch}" + _room(worst, capacity)
        return GenerationHeadroom(name, batch, new, context, context - new, True, None, worst, capacity, summary,
                                  layout.attention_model, _dtype_name(layout), tuple(dict.fromkeys(notes)))
    device = limit.binding_device or _binding(worst or {}, capacity)
    summary = _summary(limit, context, batch, device)
    return GenerationHeadroom(name, batch, new, context, limit.max_prompt_tokens, False, device,
                              limit.peak_bytes, capacity, summary, layout.attention_model, _dtype_name(layout),
                              tuple(dict.fromkeys(notes)))


def _binding(peaks: Peaks, capacity: Peaks) -> str | None:
    over = missing_bytes(peaks, capacity)
    return max(over, key=over.get) if over else None


def _summary(limit: PromptLimit, context: int | None, batch: int, device: str | None) -> str:
    device = device or "a device"
    if limit.bound < 1:
        return f"{limit.new_tokens:,} new tokens fill the whole {context:,}-token context: no room for a prompt"
    if limit.max_prompt_tokens < 1:
        return f"even a 1-token prompt (+{limit.new_tokens:,} new) will run out of memory on {device} at batch {batch}"
    if limit.whole_context:
        return (f"prompts up to {limit.max_prompt_tokens:,} tokens (+{limit.new_tokens:,} new) fit at batch {batch}; "
                f"filling the {context:,}-token context will run out of memory on {device}")
    return (f"prompts over {limit.max_prompt_tokens:,} tokens (+{limit.new_tokens:,} new) will run out of memory "
            f"on {device} at batch {batch}")


def _room(peaks: Peaks, capacity: Peaks) -> str:
    """' (peak 1.2 GiB above the weights on cuda:0, of 9.3 GiB free)': the fullest device."""
    known = [d for d in peaks if capacity.get(d)]
    if not known:
        return ""
    device = max(known, key=lambda d: peaks[d] / capacity[d])
    return f" (peak {format_bytes(peaks[device])} above the weights on {device}, of {format_bytes(capacity[device])} free)"


def failed_input_line(model: Any, name: str, snapshot: Any, *, batch: int, prompt_tokens: int,
                      new_tokens: int) -> GenerationHeadroom | None:
    """After an OOM: what the input that failed needs, against the memory free now."""
    model = unwrap(model)
    if not is_generative_decoder(model):
        return None
    try:
        predictor = GenerationPredictor.for_model(model)
        notes: list[str] = []
        capacity = capacity_now(predictor.layout, snapshot, notes)
        peaks = predictor.peaks(batch, prompt_tokens, max(new_tokens, 1))
        limit = predictor.largest_prompt(batch, max(new_tokens, 1), capacity)
    except GenerationUnknown as error:
        return _unknown(name, batch, new_tokens, str(error))
    missing = missing_bytes(peaks, capacity)
    what = f"the input that failed (batch {batch} x {prompt_tokens:,} tokens, +{new_tokens:,} new)"
    if missing:
        device = max(missing, key=missing.get)
        summary = f"{what} needs {format_bytes(missing[device])} more on {device} than is free now"
    else:
        summary = f"{what} fits in the memory free now (what the failing cell held is released)"
    summary += f"; prompts up to {limit.max_prompt_tokens:,} tokens fit" if limit.max_prompt_tokens else ""
    return GenerationHeadroom(name, batch, new_tokens, predictor.context_window, limit.max_prompt_tokens,
                              None, limit.binding_device, peaks, capacity, summary,
                              predictor.layout.attention_model, _dtype_name(predictor.layout), tuple(notes))


def _dtype_name(layout: GenLayout) -> str | None:
    return None if layout.dtype is None else dtype_name(layout.dtype)


def _unknown(name: str, batch: int, new_tokens: int, why: str, attention: str | None = None) -> GenerationHeadroom:
    return GenerationHeadroom(name, batch, new_tokens, None, None, None, None, {}, {},
                              f"unknown ({why})", attention=attention, notes=(why,))


@dataclass(frozen=True)
class FailedInput:
    """The generate call an out-of-memory error interrupted, read from its traceback."""

    batch: int
    prompt_tokens: int
    new_tokens: int


def failed_inputs(error: BaseException) -> dict[int, FailedInput]:
    """id(model) -> the input of the `generate` call (or forward pass) that failed, from the
    frames of `error`'s traceback. Only sizes are kept: no reference to a frame or a tensor."""
    found: dict[int, FailedInput] = {}
    tb = error.__traceback__
    while tb is not None:
        frame_locals = tb.tb_frame.f_locals
        model = frame_locals.get("self")
        ids = frame_locals.get("inputs_tensor", frame_locals.get("input_ids"))
        shape = getattr(ids, "shape", None)
        if model is not None and shape is not None and len(shape) == 2 and id(model) not in found:
            name = tb.tb_frame.f_code.co_name
            config = frame_locals.get("generation_config")
            if name == "generate":
                new = getattr(config, "max_new_tokens", None) or DEFAULT_NEW_TOKENS
                found[id(model)] = FailedInput(int(shape[0]), int(shape[1]), int(new))
            elif name == "forward":  # a plain forward pass: like a prefill with one new token
                found[id(model)] = FailedInput(int(shape[0]), int(shape[1]), 1)
        tb = tb.tb_next
    return found


def model_headroom(model: Any, name: str, snapshot: Any, *, batch: int = 1, new_tokens: int = DEFAULT_NEW_TOKENS,
                   failed: FailedInput | None = None):
    """The KV cache facts of `model` (measure.headroom) with the generation line attached; None
    for a model that does not generate text (no generation-headroom line for encoders)."""
    from llm_magic.measure.headroom import generation_headroom

    if not is_generative_decoder(unwrap(model)):
        return None
    kv = generation_headroom(model, name, snapshot, batch=batch)
    if failed is not None:
        line = failed_input_line(model, name, snapshot, batch=failed.batch, prompt_tokens=failed.prompt_tokens,
                                 new_tokens=failed.new_tokens)
    else:
        line = headroom(model, name, snapshot, batch=batch, new_tokens=new_tokens)
    return replace(kv, generation=line)
