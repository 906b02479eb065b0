"""The model's own `generate` on a fake replica, traced step by step and layer by layer.

A step is what `generate` does per token: a forward pass (the whole prompt for the prefill, one
token per sequence afterwards, with the cache of the steps before) and the pick of the next token
(the logits processors of the model's generation config, then argmax or a draw). Hooks on the
replica cut the call into steps, and on each decoder layer record the live bytes when it is
called, its peak, what it returns and what it keeps (the cache it grew), so that `gen_compose` can
lay the same figures over a model with many more layers of the same kinds, on several devices.

All figures are bytes counted by `gen_fake.LiveBytes` on one (fake) device.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any

from llm_magic.predict import gen_fake


@dataclass(frozen=True)
class LayerTrace:
    """One decoder layer's call, in live bytes of the whole step."""

    entry: int  # live when the layer was called (its inputs included)
    peak: int  # most live during the call
    exit: int  # live when it returned: its output, and its input still held by the caller
    hidden: int  # its first input, the hidden states (copied when the layer runs on another device)
    others: int  # its other tensor inputs (masks, rotary tables), copied likewise
    output: int  # what it returned that is not one of its inputs
    held: int  # what it kept from the steps before this one (its cache) when this step began

    @property
    def transient(self) -> int:
        return self.peak - self.entry

    @property
    def kept(self) -> int:
        """Bytes it kept when it returned, besides its output: the cache it grew (or, < 0, trimmed)."""
        return self.exit - self.entry - self.output


@dataclass(frozen=True)
class StepTrace:
    start: int  # live when the step began: what earlier steps left (the cache)
    prologue_peak: int  # most live before the first layer (embedding, masks, rotary tables)
    layers: tuple[LayerTrace, ...]
    epilogue_peak: int  # most live after the last layer (norm, head, next-token pick)
    end: int  # live when the step had picked its token

    @property
    def base(self) -> int:
        """What the prologue left for all layers besides the hidden states (masks, rotary tables, ids)."""
        first = self.layers[0]
        return first.entry - self.start - first.hidden

    @property
    def kept_after_first(self) -> int:
        """What the prologue keeps alive once the first layer is done, besides the hidden states
        and the first layer's cache (models that hold the embedding output for the whole forward)."""
        if len(self.layers) < 2:
            return 0
        first, second = self.layers[:2]
        return second.entry - first.entry - first.kept - (second.hidden - first.hidden)

    @property
    def peak(self) -> int:
        return max(self.prologue_peak, self.epilogue_peak, *(layer.peak for layer in self.layers))


class _Hooks:
    """Hooks that cut a `generate` call into steps (the model's forward calls) and trace each
    decoder layer's call in them."""

    def __init__(self, replica, layers, counter) -> None:
        self.counter = counter
        self.steps: list[dict] = []
        self.handles = [replica.register_forward_pre_hook(self._step)]
        for layer in layers:
            self.handles.append(layer.register_forward_pre_hook(self._pre, with_kwargs=True))
            self.handles.append(layer.register_forward_hook(self._post, with_kwargs=True))

    def _step(self, module, args):
        self.finish()
        self.steps.append({"start": self.counter.mark(), "prologue_peak": None, "layers": []})

    def finish(self) -> None:
        """Close the open step: what came after its last layer (head, next-token pick) is its epilogue."""
        if self.steps and "end" not in self.steps[-1]:
            self.steps[-1].update(epilogue_peak=self.counter.peak, end=self.counter.live)

    def _pre(self, module, args, kwargs):
        counter, step = self.counter, self.steps[-1]
        if step["prologue_peak"] is None:
            step["prologue_peak"] = counter.peak
        inputs = gen_fake._tensors((args, kwargs))
        hidden = args[0] if args else kwargs.get("hidden_states")
        hidden_bytes = counter.bytes_of([hidden]) if hidden is not None else 0
        step["layers"].append({
            "entry": counter.mark(),
            "hidden": hidden_bytes,
            "others": counter.bytes_of(inputs) - hidden_bytes,
            "inputs": {id(t.untyped_storage()) for t in inputs},
        })

    def _post(self, module, args, kwargs, output):
        counter = self.counter
        record = self.steps[-1]["layers"][-1]
        inputs = record.pop("inputs")
        returned = [t for t in gen_fake._tensors(output) if id(t.untyped_storage()) not in inputs]
        record.update(peak=counter.peak, exit=counter.live, output=counter.bytes_of(returned))
        counter.mark()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def traces(self, count: int) -> list[StepTrace]:
        """The steps as StepTraces, each layer's `held` the sum of what it kept in the steps before."""
        held, traces = [0] * count, []
        for step in self.steps:
            if len(step["layers"]) != count:
                raise RuntimeError(f"{len(step['layers'])} decoder layer calls in a step, {count} expected")
            layers = tuple(
                LayerTrace(r["entry"], r["peak"], r["exit"], r["hidden"], r["others"], r["output"], held[i])
                for i, r in enumerate(step["layers"])
            )
            held = [layer.held + layer.kept for layer in layers]
            prologue = step["prologue_peak"] if step["prologue_peak"] is not None else step["epilogue_peak"]
            traces.append(StepTrace(step["start"], prologue, layers, step["epilogue_peak"], step["end"]))
        return traces


def run_generate(replica: Any, layers, *, batch: int, prompt: int, new_tokens: int, padded: bool,
                 cpu: bool = False) -> list[StepTrace]:
    """The model's own `generate` on the fake `replica`: one StepTrace per forward call.

    The prompt ids and attention mask are real (small): generate and the masking code read
    them. With `padded`, one row starts with a pad token (a batch of unequal prompts, padded on
    the left as decoder-only generation requires). `cpu`: the model runs on the cpu, whose
    attention kernel allocates scratch memory no operator returns; otherwise on an accelerator,
    whose caching allocator hands out blocks of 512 bytes.
    """
    import torch

    config = copy.deepcopy(replica.generation_config)
    token, spare = _ordinary_tokens(config, replica.config)
    config.max_new_tokens, config.pad_token_id = new_tokens, _pad_id(config, spare)
    config.max_length = config.min_length = config.min_new_tokens = None
    input_ids = torch.full((batch, prompt), token, dtype=torch.long)
    mask = torch.ones(batch, prompt, dtype=torch.long)
    if padded and batch > 1:
        mask[-1, 0] = 0
    counter = gen_fake.live_bytes_mode(cpu_kernels=cpu, block=1 if cpu else 512)
    hooks = _Hooks(replica, layers, counter)
    # An operator with no fake kernel for these inputs is reported by us in one line (the
    # caller's "unknown"); torch would also log its traceback at error level.
    quiet = logging.getLogger("torch._subclasses.fake_tensor")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        with replica.fake_mode, gen_fake.small_real_ops_mode(token, counter), counter:
            counter.mark()
            replica.generate(input_ids=input_ids, attention_mask=mask, generation_config=config)
        hooks.finish()
    finally:
        hooks.remove()
        quiet.setLevel(level)
    return hooks.traces(len(layers))


def _special_ids(config: Any) -> set[int]:
    ids: set[int] = set()
    for name in ("eos_token_id", "pad_token_id", "bos_token_id", "decoder_start_token_id"):
        value = getattr(config, name, None)
        ids.update(value if isinstance(value, (list, tuple)) else [value] if isinstance(value, int) else [])
    return ids


def _ordinary_tokens(generation_config: Any, config: Any) -> tuple[int, int]:
    """Two ids that are no special token: one for the prompt and the fake "generated" tokens
    (they never stop generation), one to pad with when the model names no pad token."""
    special = _special_ids(generation_config) | _special_ids(config)
    ordinary = (token for token in range(len(special) + 2) if token not in special)
    return next(ordinary), next(ordinary)


def _pad_id(generation_config: Any, spare: int) -> int:
    pad = getattr(generation_config, "pad_token_id", None)
    if isinstance(pad, int):
        return pad
    eos = getattr(generation_config, "eos_token_id", None)
    eos = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
    return eos if isinstance(eos, int) else spare
