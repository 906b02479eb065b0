"""What a prediction says, and the immutable draft its steps fill in.

Each step of the pre-flight (`request`, `replay`, `sizing`, `device_map`, `load_errors`,
`missing`) takes a `Draft` and returns a new one with what it learned; a step that cannot go on
raises `Unknown` carrying the draft as it stood, so what was known up to there (the class, the
total bytes, the budget) is still reported. `finish` turns the last draft into a `Prediction`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from llm_magic.names import accelerators, tier_rank
from llm_magic.predict.budget import Budget


@dataclass(frozen=True)
class Prediction:
    """What one `from_pretrained` call is predicted to do. None means "unknown" (see notes)."""

    status: str  # "ok" | "unknown" | "skipped" (not a model: tokenizers are not placed)
    model_id: str | None
    model_class: str | None  # the concrete class built ("LlamaForCausalLM")
    transformers_version: str
    dtype: str | None  # the dtype weights load in ("bfloat16")
    device_map: dict[str, str] | None  # module -> "cuda:0" / "cpu" / "disk"
    bytes_by_device: dict[str, int] | None  # bytes
    total_bytes: int | None  # bytes of parameters and buffers once loaded, tied weights once
    checkpoint_bytes: int | None  # bytes of the stored tensors on disk
    budget: dict[str, int | None] | None  # bytes per device the algorithm was given (after margins); None unknown
    budget_source: str | None
    best_device: str | None  # fastest tier on this machine: "cuda:0", or "cpu" without accelerator
    slowest_tier: str | None  # slowest place anything lands: "cuda:0" / "cpu" / "disk"
    slower_tier: bool | None  # anything lands on a slower tier than best_device
    missing_bytes: int | None  # more bytes best_device needs so nothing lands on a slower tier
    missing_bytes_of: str | None  # what missing_bytes adds to: "free memory on cuda:0" / "max_memory['cpu']"
    will_raise: tuple[str, ...] = ()  # errors from_pretrained will raise, as far as can be told
    notes: tuple[str, ...] = ()
    elapsed_s: float = 0.0
    # Modules per device, counted as the placement table counts a loaded model's (a module that
    # owns a tensor, on the device holding most of its bytes), so the two tables agree.
    modules_by_device: dict[str, int] | None = None
    # The generation headroom of the predicted placement (`predict(..., generation_batch=N)`, for
    # `%%llmload --dry-run`): predict.gen_headroom.GenerationHeadroom, or None.
    generation: Any = None

    def to_dict(self) -> dict[str, Any]:
        def copy(value):
            return None if value is None else dict(value)

        return {
            "status": self.status,
            "model_id": self.model_id,
            "model_class": self.model_class,
            "transformers_version": self.transformers_version,
            "dtype": self.dtype,
            "device_map": copy(self.device_map),
            "bytes_by_device": copy(self.bytes_by_device),
            "modules_by_device": copy(self.modules_by_device),
            "total_bytes": self.total_bytes,
            "checkpoint_bytes": self.checkpoint_bytes,
            "budget": copy(self.budget),
            "budget_source": self.budget_source,
            "best_device": self.best_device,
            "slowest_tier": self.slowest_tier,
            "slower_tier": self.slower_tier,
            "missing_bytes": self.missing_bytes,
            "missing_bytes_of": self.missing_bytes_of,
            "will_raise": list(self.will_raise),
            "notes": list(self.notes),
            "elapsed_s": self.elapsed_s,
            "generation": None if self.generation is None else self.generation.to_dict(),
        }


@dataclass(frozen=True)
class Context:
    """The inputs every step reads: free memory after the release, and the installed version."""

    free: Mapping[str, int | None]  # bytes per device ("cuda:0", "cpu") after the release; None unknown
    cached_unused: Mapping[str, int] | None
    version: tuple[int, int]  # (major, minor) of transformers
    version_string: str
    find_missing: bool = True
    generation_batch: int | None = None  # also predict the generation headroom, at this batch

    @property
    def best_device(self) -> str:
        # A full GPU is still the best device present: a stale model filling it is the case to catch.
        found = accelerators(self.free)
        return found[0] if found else "cpu"


@dataclass(frozen=True)
class Draft:
    """What is known so far. Steps return a new draft (`dataclasses.replace`), never change one."""

    model_id: str | None = None
    model_class: str | None = None
    dtype: str | None = None
    device_map: dict[str, str] | None = None
    bytes_by_device: dict[str, int] | None = None
    modules_by_device: dict[str, int] | None = None
    total_bytes: int | None = None
    checkpoint_bytes: int | None = None
    budget: Budget | None = None
    missing_bytes: int | None = None
    missing_bytes_of: str | None = None
    will_raise: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default=())
    generation: Any = None

    def noted(self, *notes: str) -> Draft:
        return replace(self, notes=self.notes + tuple(notes))

    def raising(self, *errors: str) -> Draft:
        return replace(self, will_raise=self.will_raise + tuple(errors))

    def with_(self, **changes: Any) -> Draft:
        return replace(self, **changes)


class Unknown(Exception):
    """An input the prediction needs cannot be known; `reason` says which, `draft` what was known."""

    def __init__(self, reason: str, draft: Draft):
        super().__init__(reason)
        self.reason = reason
        self.draft = draft


def finish(draft: Draft, status: str, context: Context, started: float) -> Prediction:
    """The prediction a draft amounts to; tiers are compared against the machine's best device."""
    best = context.best_device if status != "skipped" else None
    slowest = slower = None
    if draft.device_map is not None and best is not None:
        used = set(draft.device_map.values())
        slowest = max(used, key=tier_rank) if used else None
        slower = slowest is not None and tier_rank(slowest) > tier_rank(best)
    budget = draft.budget
    return Prediction(
        status=status,
        model_id=draft.model_id,
        model_class=draft.model_class,
        transformers_version=context.version_string,
        dtype=draft.dtype,
        device_map=draft.device_map,
        bytes_by_device=draft.bytes_by_device,
        modules_by_device=draft.modules_by_device,
        total_bytes=draft.total_bytes,
        checkpoint_bytes=draft.checkpoint_bytes,
        budget=None if budget is None else {k: None if v is None else int(v) for k, v in budget.max_memory.items()},
        budget_source=None if budget is None else budget.source,
        best_device=best,
        slowest_tier=slowest,
        slower_tier=slower,
        missing_bytes=draft.missing_bytes,
        missing_bytes_of=draft.missing_bytes_of,
        will_raise=draft.will_raise,
        notes=draft.notes,
        elapsed_s=time.perf_counter() - started,
        generation=draft.generation,
    )
