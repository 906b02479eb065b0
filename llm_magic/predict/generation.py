"""Will a generation loop survive? The peak of each `generate` call, per device, before it runs.

The peak of one `generate` call on a device is the weights already there plus, at the worst
moment, the KV cache (the cache class and sliding windows the model really uses) and the
transient tensors of the prefill or of a decoding step. The transient part comes from running
the model's own `generate` on a fake replica (gen_replica, gen_trace: no real memory), laid over
every layer and device the model has (gen_compose); lengths are searched over in gen_search.

`GenerationPredictor` answers for one model: each device's peak at a batch, prompt length and
number of new tokens; the longest prompt that fits a capacity; and which items of a list of
prompts will not fit, formed into batches in order and padded to the longest in each batch.
Capacities are bytes available for generation on each device, above the weights (what is free
now, or a budget minus the weights already there).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from llm_magic.predict.gen_layout import GenLayout, layout_of_loaded, layout_signature
from llm_magic.predict.gen_replica import Simulator
from llm_magic.predict.gen_search import PeakCurve, Peaks, largest_fitting

_KEEP = 4  # predictors kept for reloads of the same model, most recent last
_RECENT: "OrderedDict[tuple, GenerationPredictor]" = OrderedDict()


class GenerationUnknown(Exception):
    """The peak cannot be simulated for this model; the message says why, in one line."""


@dataclass(frozen=True)
class ItemFit:
    """One input of a list: its batch's peak against the capacity of each device."""

    index: int
    tokens: int  # the item's prompt tokens
    batch_tokens: int  # the length its batch is padded to
    batch_size: int  # prompts in its batch (the last batch may be smaller)
    padded: bool  # its batch holds prompts of unequal lengths
    fits: bool
    peak_bytes: Peaks  # weights + generation, per device
    missing_bytes: Peaks  # per device where it does not fit (peak - capacity)

    def to_dict(self) -> dict:
        return {
            "index": self.index,
            "tokens": self.tokens,
            "batch_tokens": self.batch_tokens,
            "batch_size": self.batch_size,
            "padded": self.padded,
            "fits": self.fits,
            "peak_bytes": dict(self.peak_bytes),
            "missing_bytes": dict(self.missing_bytes),
        }


@dataclass(frozen=True)
class PromptLimit:
    """The longest prompt one generate call can take at a batch size and number of new tokens."""

    batch: int
    new_tokens: int
    max_prompt_tokens: int  # 0: not even a one-token prompt fits (or no room left in the context)
    bound: int  # the longest prompt the context window allows (context - new tokens)
    binding_device: str | None  # the device that runs out first above max_prompt_tokens
    peak_bytes: Peaks  # generation bytes at max_prompt_tokens (at 1 token when none fits)

    @property
    def whole_context(self) -> bool:
        return self.max_prompt_tokens >= self.bound


@dataclass
class GenerationPredictor:
    """Simulated peaks of one model's generate calls; every simulation is kept and reused."""

    layout: GenLayout
    simulator: Simulator = field(init=False)

    def __post_init__(self) -> None:
        self.simulator = Simulator(self.layout)
        self._curves: dict[tuple, PeakCurve] = {}

    @classmethod
    def for_model(cls, model: Any) -> "GenerationPredictor":
        """The predictor of a loaded model, reusing the simulations of an identical one.

        Re-running a load cell loads the same checkpoint again: same class, config, dtype,
        attention and placement, so the same fake runs. The last few predictors are kept (they
        hold fake tensors and configs, no real memory), so a reload costs no simulation.
        """
        try:
            layout = layout_of_loaded(model)
            key = layout_signature(layout)
            predictor = _RECENT.pop(key, None) or cls(layout)
        except Exception as error:  # noqa: BLE001 - any modeling code can fail on fake tensors
            raise GenerationUnknown(why(error)) from error
        _RECENT[key] = predictor
        while len(_RECENT) > _KEEP:
            _RECENT.popitem(last=False)
        return predictor

    @property
    def context_window(self) -> int | None:
        return self.layout.context_window

    def prompt_bound(self, new_tokens: int) -> int:
        """The longest prompt the context window leaves room for (a large number without one)."""
        context = self.context_window or (1 << 20)
        return max(0, context - new_tokens)

    def curve(self, batch: int, new_tokens: int, padded: bool = False) -> PeakCurve:
        key = (batch, new_tokens, padded and batch > 1)
        if key not in self._curves:
            longest = self.prompt_bound(new_tokens)
            self._curves[key] = PeakCurve(self.simulator, batch, new_tokens, key[2], longest)
        return self._curves[key]

    def peaks(self, batch: int, prompt: int, new_tokens: int, *, padded: bool = False, exact: bool = True,
              simulate_decode: bool = True) -> Peaks:
        """Generation bytes (above the weights) at the peak of one generate call, per device:
        simulated (`exact`; the last decoding step too unless not `simulate_decode`, then on the
        line through simulated steps), or interpolated between lengths simulated before."""
        curve = self.curve(batch, new_tokens, padded)
        if exact:
            return self._simulate(lambda tokens: curve.peaks(tokens, simulate_decode=simulate_decode), max(1, prompt))
        return self._simulate(curve.estimate, max(1, prompt))

    def largest_prompt(self, batch: int, new_tokens: int, capacity: Peaks, *, padded: bool = False) -> PromptLimit:
        curve = self.curve(batch, new_tokens, padded)
        bound = self.prompt_bound(new_tokens)
        if bound < 1:
            return PromptLimit(batch, new_tokens, 0, 0, None, {})

        def excess(peaks) -> int:
            return _excess(peaks, capacity)[0]

        # The prefill (and first step) first: it binds unless many new tokens grow a long cache.
        best = self._simulate(largest_fitting, lambda t: excess(curve.prefill(t)), 1, bound)
        peaks_of = curve.prefill
        if best >= 1 and new_tokens >= 3:
            last = self._simulate(lambda: curve.decode(best + new_tokens - 2, simulate=True))
            if excess(last) > 0:  # the last decoding step binds: search with it
                peaks_of = curve.peaks
                best = self._simulate(largest_fitting, lambda t: excess(curve.peaks(t)), 1, best)
                while best >= 1 and excess(self._simulate(lambda: curve.peaks(best, simulate_decode=True))) > 0:
                    best -= 1  # the interpolated decode step was a little low: step back to what fits
        at = max(best, 1)
        peak = self._simulate(lambda: curve.peaks(at, simulate_decode=True) if new_tokens >= 3 and best >= 1 else peaks_of(at))
        over = self._simulate(peaks_of, best + 1) if best < bound else None
        binding = _excess(over, capacity)[1] if over is not None else None
        return PromptLimit(batch, new_tokens, max(best, 0), bound, binding, peak)

    def largest_new_tokens(self, batch: int, prompt: int, new_tokens: int, capacity: Peaks, *, padded: bool = False) -> int:
        """The most new tokens (below `new_tokens`) a prompt of `prompt` tokens fits with; 0 if none."""
        curve = self.curve(batch, new_tokens, padded)
        if _excess(self._simulate(curve.prefill, prompt), capacity)[0] > 0:
            return 0
        return self._simulate(largest_fitting, lambda n: _excess(curve.decode(prompt + n - 2), capacity)[0] if n >= 3 else -1,
                              1, new_tokens - 1)

    def _simulate(self, function, *args):
        try:
            return function(*args)
        except GenerationUnknown:
            raise
        except Exception as error:  # noqa: BLE001 - modeling code on fake tensors: say why, never raise raw
            raise GenerationUnknown(why(error)) from error



def _excess(peaks: Peaks, capacity: Peaks) -> tuple[int, str | None]:
    """(the largest peak - capacity over the devices, that device); devices without a capacity never bind."""
    worst, device = None, None
    for name, nbytes in peaks.items():
        room = capacity.get(name)
        if room is not None and (worst is None or nbytes - room > worst):
            worst, device = nbytes - room, name
    return (worst if worst is not None else -1), device


def missing_bytes(peaks: Peaks, capacity: Peaks) -> Peaks:
    return {device: nbytes - capacity[device] for device, nbytes in peaks.items()
            if capacity.get(device) is not None and nbytes > capacity[device]}


def batches(lengths: list[int], batch: int) -> list[list[int]]:
    """Item indices in batches of `batch`, in order, as a loop over the list would form them."""
    return [list(range(start, min(start + batch, len(lengths)))) for start in range(0, len(lengths), batch)]


def fit_items(predictor: GenerationPredictor, lengths: list[int], batch: int, new_tokens: int,
              capacity: Peaks, weights: Peaks) -> tuple[ItemFit, ...]:
    """Each item's fit: its batch padded to the longest prompt in it, simulated where it matters.

    Simulated (the prefill; decoding steps on their interpolated line): batches within 2% of a
    capacity, where the decision is made, and the first batch that does not fit, whose figures
    the report quotes. Elsewhere the peak is interpolated between simulated lengths. A batch
    whose prompts and new tokens overflow the context window does not fit (no bytes missing).
    """
    items: list[ItemFit] = []
    bound, failed = predictor.prompt_bound(new_tokens), False
    for group in batches(lengths, batch):
        longest = max(lengths[i] for i in group)
        padded, size = len({lengths[i] for i in group}) > 1, len(group)
        tokens = min(longest, max(bound, 1))
        peaks = predictor.peaks(size, tokens, new_tokens, padded=padded, exact=False)
        worst = _excess(peaks, capacity)[0]
        if abs(worst) <= _margin(capacity) or (worst > 0 and not failed):
            peaks = predictor.peaks(size, tokens, new_tokens, padded=padded, exact=True, simulate_decode=False)
        missing = missing_bytes(peaks, capacity)
        fits = not missing and longest <= bound
        failed = failed or not fits
        total = {device: weights.get(device, 0) + nbytes for device, nbytes in peaks.items()}
        for index in group:
            items.append(ItemFit(index, lengths[index], longest, size, padded, fits, total, missing))
    return tuple(items)


def _margin(capacity: Peaks) -> int:
    known = [room for room in capacity.values() if room is not None]
    return max(known) // 50 if known else 0


def why(error: BaseException) -> str:
    """One short line for an error of the simulation: "RuntimeError: no fake kernel ..."."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}"[:200] if text else type(error).__name__
