"""`%llmfit MODEL_VAR`: will a generation loop over these inputs survive, and which input will run out?

Reads the model (and the prompts) from the namespace, predicts the peak of each `generate`
call per device (predict/generation.py: the model's own generate on a fake replica, no real
memory), and compares it with what each device can give: the memory free now, or a budget
("cuda:0=15GiB,cpu=12GiB": would this fit on a smaller machine?). Returns a `FitReport`.
Nothing in the namespace changes; bad input is a `FitError` (one line) before any work.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

from llm_magic.names import normalize_device
from llm_magic.units import format_bytes

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


class FitError(ValueError):
    """Bad input to %llmfit: one line, nothing done."""


@dataclass(frozen=True)
class FitOptions:
    model_var: str
    prompts: str | None = None  # an expression evaluated in the namespace
    tokens: tuple[int, ...] | None = None  # bare prompt lengths
    tokenizer_var: str = "tokenizer"
    chat: bool = False
    max_new_tokens: int = 256
    batch: int = 1
    budget: str | None = None  # "cuda:0=15GiB,cpu=12GiB"


@dataclass(frozen=True)
class FitReport:
    model: str  # the name the user gave
    class_name: str
    attention: str
    batch: int
    max_new_tokens: int
    context_window: int | None
    max_prompt_tokens: int  # the longest prompt that fits at this batch and max_new_tokens
    binding_device: str | None  # the device that runs out first beyond it
    weights_bytes: dict[str, int]  # per device, resident now
    capacity_bytes: dict[str, int]  # per device: weights + free now, or the budget
    capacity_from: dict[str, str]  # per device: "free now" or "budget"
    items: tuple = ()  # generation.ItemFit, one per prompt
    first_failing_item: int | None = None
    first_failing: str | None = None  # the sentence about it, with what to do
    notes: tuple[str, ...] = ()
    seconds: float = 0.0  # wall time of the prediction
    simulations: int = 0  # fake generate calls run

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "class_name": self.class_name,
            "attention": self.attention,
            "batch": self.batch,
            "max_new_tokens": self.max_new_tokens,
            "context_window": self.context_window,
            "max_prompt_tokens": self.max_prompt_tokens,
            "binding_device": self.binding_device,
            "weights_bytes": dict(self.weights_bytes),
            "capacity_bytes": dict(self.capacity_bytes),
            "capacity_from": dict(self.capacity_from),
            "first_failing_item": self.first_failing_item,
            "first_failing": self.first_failing,
            "items": [item.to_dict() for item in self.items],
            "notes": list(self.notes),
            "seconds": round(self.seconds, 3),
            "simulations": self.simulations,
        }

    @property
    def failing(self) -> tuple:
        return tuple(item for item in self.items if not item.fits)

    def __str__(self) -> str:
        return self._repr_mimebundle_(include={"text/plain"})["text/plain"]  # what a terminal shows

    def _repr_mimebundle_(self, include=None, exclude=None) -> dict:
        from llm_magic.render.core import mimebundle
        from llm_magic.render.fit import render_fit

        return mimebundle(render_fit(self), include=include, exclude=exclude)


def parse_budget(text: str) -> dict[str, int]:
    """'cuda:0=15GiB,cpu=12GiB' -> {'cuda:0': 16106127360, 'cpu': 12884901888}."""
    budget: dict[str, int] = {}
    for part in filter(None, (piece.strip() for piece in text.split(","))):
        device, sep, amount = part.partition("=")
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", amount)
        if not sep or not match or match.group(2).lower() not in _UNITS:
            raise FitError(f"--budget: cannot read {part!r} (write DEVICE=SIZE, e.g. cuda:0=15GiB,cpu=12GiB)")
        written = device.strip().lower()
        device = normalize_device(written)  # "0", "cuda", "mps" -> "cuda:0", "cuda:0", "mps:0"
        if not re.fullmatch(r"(cpu|(cuda|xpu|mps|npu):\d+)", device):
            raise FitError(f"--budget: unknown device {written!r} (cpu, cuda:0, cuda:1, ...)")
        budget[device] = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if not budget:
        raise FitError("--budget is empty (write DEVICE=SIZE, e.g. cuda:0=15GiB,cpu=12GiB)")
    return budget


def _model(shell, name: str) -> Any:
    from llm_magic.engine.paths import Unresolvable, parse_target, resolve
    from llm_magic.measure.placement import find_model
    from llm_magic.predict.gen_layout import is_generative_decoder, unwrap

    try:
        path = parse_target(name)
        value = resolve(path, shell.user_ns)
    except ValueError as error:
        raise FitError(str(error)) from None
    except Unresolvable as missing:  # which part is missing: "pipe has no attribute 'modle'"
        raise FitError(missing.reason if path.steps else f"no variable {name!r} in the namespace") from None
    model = find_model(value)
    if model is None:
        raise FitError(f"{name} is a {type(value).__name__}, not a model")
    model = unwrap(model)
    if not is_generative_decoder(model):
        raise FitError(f"{name} ({type(model).__name__}) does not generate text: %llmfit is for decoder-only language models")
    return model


def _lengths(shell, options: FitOptions) -> list[int] | None:
    from llm_magic.predict.gen_prompts import PromptError, prompt_lengths

    if options.tokens is not None:
        if any(tokens < 1 for tokens in options.tokens):
            raise FitError("--tokens: lengths must be at least 1")
        return list(options.tokens)
    if options.prompts is None:
        return None
    try:
        prompts = shell.ev(options.prompts)
    except Exception as error:  # noqa: BLE001 - the user's expression
        raise FitError(f"--prompts: {type(error).__name__}: {error}".splitlines()[0]) from None
    tokenizer = shell.user_ns.get(options.tokenizer_var)
    try:
        return prompt_lengths(prompts, tokenizer, chat=options.chat)
    except PromptError as error:
        if tokenizer is None and "tokenizer" in str(error):
            raise FitError(f"{error} (no variable {options.tokenizer_var!r})") from None
        raise FitError(str(error)) from None


def check(options: FitOptions) -> None:
    if options.batch < 1:
        raise FitError("--batch must be at least 1")
    if options.max_new_tokens < 1:
        raise FitError("--max-new-tokens must be at least 1")
    if options.prompts is not None and options.tokens is not None:
        raise FitError("give --prompts or --tokens, not both")


def run_llmfit(shell, options: FitOptions) -> FitReport:
    """Check the input, then predict. Raises FitError (one line) before any work on bad input."""
    from llm_magic.ipython.shell_state import require_shell

    require_shell(shell)
    check(options)
    budget = parse_budget(options.budget) if options.budget else {}
    model = _model(shell, options.model_var)
    lengths = _lengths(shell, options)
    started = time.perf_counter()
    return _report(model, options, budget, lengths, started)


def _capacity(layout, budget: dict[str, int], notes: list[str]) -> tuple[dict, dict, dict]:
    """(bytes for generation, total capacity, where it comes from) per device."""
    from llm_magic.measure.memory import memory_snapshot
    from llm_magic.predict.gen_headroom import capacity_now

    snapshot = memory_snapshot()
    weights = layout.weights_by_device
    free = capacity_now(layout, snapshot, notes, {d: b - weights.get(d, 0) for d, b in budget.items()})
    total = {device: room + weights.get(device, 0) for device, room in free.items()}
    source = {device: "budget" if device in budget else "free now" for device in free}
    for device, room in free.items():
        if room < 0:
            notes.append(f"the weights on {device} ({format_bytes(weights.get(device, 0))}) exceed its budget")
    return free, total, source


def _report(model: Any, options: FitOptions, budget: dict[str, int], lengths: list[int] | None, started: float) -> FitReport:
    from llm_magic.predict.generation import (
        GenerationPredictor,
        GenerationUnknown,
        fit_items,
    )

    notes: list[str] = []
    try:
        predictor = GenerationPredictor.for_model(model)
        layout = predictor.layout
        free, total, source = _capacity(layout, budget, notes)
        limit = predictor.largest_prompt(options.batch, options.max_new_tokens, free)
        items = fit_items(predictor, lengths, options.batch, options.max_new_tokens, free, layout.weights_by_device) if lengths else ()
        first = next((item for item in items if not item.fits), None)
        sentence = _first_failing(predictor, first, options, free, limit.max_prompt_tokens) if first else None
    except GenerationUnknown as error:
        raise FitError(f"the generation peak of {options.model_var} cannot be simulated ({error})") from None
    if layout.context_window and options.max_new_tokens >= layout.context_window:
        notes.append(f"--max-new-tokens {options.max_new_tokens:,} fills the {layout.context_window:,}-token context window")
    return FitReport(
        model=options.model_var,
        class_name=type(model).__name__,
        attention=layout.attention_model,
        batch=options.batch,
        max_new_tokens=options.max_new_tokens,
        context_window=layout.context_window,
        max_prompt_tokens=limit.max_prompt_tokens,
        binding_device=limit.binding_device,
        weights_bytes=dict(layout.weights_by_device),
        capacity_bytes=total,
        capacity_from=source,
        items=items,
        first_failing_item=first.index if first else None,
        first_failing=sentence,
        notes=tuple(dict.fromkeys([*notes, *layout.notes])),
        seconds=time.perf_counter() - started,
        simulations=predictor.simulator.runs,
    )


def _first_failing(predictor, item, options: FitOptions, free: dict, max_prompt: int) -> str:
    """'item 100 (6,412 tokens) needs 3.1 GiB more on cuda:0 — set max_new_tokens ≤ 120,
    truncate to 4,096 tokens, or use batch 1'."""
    from llm_magic.predict.generation import missing_bytes

    padded = f", its batch padded to {item.batch_tokens:,}" if item.batch_tokens != item.tokens else ""
    if not item.missing_bytes:  # prompt + new tokens overflow the context window
        bound = predictor.prompt_bound(options.max_new_tokens)
        return (f"item {item.index} ({item.tokens:,} tokens{padded}) does not fit the {predictor.context_window:,}-token "
                f"context with {options.max_new_tokens:,} new tokens — truncate to {bound:,} tokens")
    device = max(item.missing_bytes, key=item.missing_bytes.get)
    head = f"item {item.index} ({item.tokens:,} tokens{padded}) needs {format_bytes(item.missing_bytes[device])} more on {device}"
    fixes = []
    new = predictor.largest_new_tokens(item.batch_size, item.batch_tokens, options.max_new_tokens, free, padded=item.padded)
    if new >= 1:
        fixes.append(f"set max_new_tokens ≤ {new:,}")
    if max_prompt >= 1:
        fixes.append(f"truncate to {max_prompt:,} tokens")
    if item.batch_size > 1 and not missing_bytes(predictor.peaks(1, item.tokens, options.max_new_tokens), free):
        fixes.append("use batch 1")
    if not fixes:
        return head + " — it does not fit even alone: free memory or use a smaller model"
    return head + " — " + (", ".join(fixes[:-1]) + ", or " + fixes[-1] if len(fixes) > 1 else fixes[0])
