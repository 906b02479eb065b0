"""Out-of-memory rescue: after a cell dies of an OOM, give the memory back and say why it ran out.

When a cell fails with `torch.OutOfMemoryError` (or a RuntimeError saying "out of memory"), the
failing traceback keeps every frame of the call alive, and with them the frames' locals: the
activations, the KV cache, the batch. IPython keeps that traceback (`sys.last_traceback`,
`InteractiveTB.tb`, `last_execution_result.error_in_exec`) until the next error, so the memory
that was in use when the allocation failed stays in use, and the usual cure is a restart.

After such a cell (IPython's `post_run_cell` event, so IPython's own traceback is already shown
and nothing about the exception changes), `OOMRescue`:

1. clears the failing traceback's frames (their locals go; the exception object, its type and
   its traceback lines stay), collects garbage and empties PyTorch's CUDA cache, and proves with
   weak references which tensors that only the frames held are gone;
2. measures what is left (free memory, who holds it, each loaded model's generation headroom)
   into an `OOMExplanation`, and shows it below the traceback (render/oom.py).

torch is never imported here: an OOM from torch means torch is already loaded.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from itertools import islice
from typing import TYPE_CHECKING, Any

from llm_magic.commands.oom_errors import (
    OOMMessage,
    error_message,
    find_oom,
    first_line,
    parse_oom_message,
)
from llm_magic.engine.holders import HIDDEN, NAMED, UNNAMED, HolderRow, scan_holders
from llm_magic.engine.release import HiddenRef, Target, release
from llm_magic.engine.shapes import instance_dict
from llm_magic.engine.tensors import Footprint, find_tensor_holders, loaded_torch
from llm_magic.engine.walk import WalkStats
from llm_magic.ipython.shell_state import (
    clear_traceback_frames,
    failing_tracebacks,
    frame_roots,
    hidden_refs,
    naming_roots,
    visible_names,
)
from llm_magic.units import format_by_device, format_bytes

if TYPE_CHECKING:
    from llm_magic.measure.headroom import Headroom

MAX_HOLDERS = 6  # holders listed in the explanation, biggest first
MAX_MODELS = 3  # models given a generation-headroom line


# -- releasing the failing traceback's frames ----------------------------------------------


@dataclass(frozen=True)
class FrameRelease:
    """What clearing the failing traceback's frames gave back (proven by weak references)."""

    frames_cleared: int
    freed_bytes: dict[str, int]  # per device: storages of objects now proven gone
    freed: tuple[str, ...]  # the frame locals that held them, as labels
    kept: tuple[tuple[str, tuple[str, ...]], ...]  # (frame local, who else still holds it)

    def to_dict(self) -> dict:
        return {
            "frames_cleared": self.frames_cleared,
            "freed_bytes": dict(self.freed_bytes),
            "freed": list(self.freed),
            "kept": [{"label": label, "held_by": list(held_by)} for label, held_by in self.kept],
        }


def _frame_only_targets(shell, tracebacks: list[types.TracebackType]) -> list:
    """Release targets: tensor holders the frames reach whose storages no user name reaches.

    The user's names are walked first, so what they reach is not claimed by the frames; a frame
    local that is a piece of a named model (`self` in a layer's forward) shares all its storages
    with the model and is left out too: clearing the frame frees nothing of it.
    """
    stats = WalkStats()
    stats.seen.add(id(shell))  # never walk into the shell: it reaches its own history
    named = Footprint().add_all(leaf for _, leaf in find_tensor_holders(visible_names(shell), stats=stats))
    targets = []
    for label, leaf in find_tensor_holders(frame_roots(tracebacks), stats=stats):
        keys = Footprint().add(leaf).storage_keys
        if keys and not keys <= named.storage_keys:
            targets.append(Target(label, leaf, ()))
    return targets


def release_frames(shell, error: BaseException) -> FrameRelease:
    """Clear the failing traceback's frames, collect, empty the CUDA cache; prove what went."""
    tracebacks = failing_tracebacks(shell, error)
    cleared: list[int] = []
    frames = HiddenRef(
        "the failing traceback's frames",
        roots=lambda: frame_roots(tracebacks),
        clear=lambda: cleared.append(clear_traceback_frames(tracebacks)),
    )
    targets = _frame_only_targets(shell, tracebacks)
    # also_clear: the frames are cleared even when they hold no tensor of their own.
    result = release(targets, [frames], lambda: naming_roots(shell), also_clear=[frames])
    return FrameRelease(
        frames_cleared=sum(cleared),
        freed_bytes=dict(result.freed_bytes),
        freed=tuple(item.label for item in result.released if item.freed),
        kept=tuple((item.label, item.held_by) for item in result.released if not item.freed),
    )


# -- measuring what is left ------------------------------------------------------------------


def _current_device() -> str | None:
    """The CUDA device PyTorch allocates on now, if CUDA is in use (never initialises it)."""
    torch = loaded_torch()
    try:
        if torch is not None and torch.cuda.is_initialized():
            return f"cuda:{torch.cuda.current_device()}"
    except Exception:
        return None
    return None


def _rank_holders(rows, device: str | None) -> tuple[HolderRow, ...]:
    held = [row for row in rows if row.total > 0]
    held.sort(key=lambda row: (-(row.bytes_by_device.get(device, 0) if device else 0), -row.total, row.path))
    return tuple(held[:MAX_HOLDERS])


def _language_models(shell) -> list[tuple[str, Any]]:
    """The user's models that have a config to size a KV cache from (a plain torch module has none)."""
    from llm_magic.measure.placement import find_model

    found: list[tuple[str, Any]] = []
    for name, value in visible_names(shell):
        model = find_model(value)
        if model is None or any(model is other for _, other in found):
            continue
        if (instance_dict(model) or {}).get("config") is not None:
            found.append((name if model is value else f"{name}.model", model))
    return found



@dataclass(frozen=True)
class OOMExplanation:
    error: str  # "OutOfMemoryError: CUDA out of memory. Tried to allocate ..." (first line)
    message: OOMMessage  # figures at the moment of failure
    device: str | None  # the device that ran out, when known
    free_bytes_now: int | None  # measured after the rescue; None: unknown
    free_note: str | None  # why free_bytes_now is unknown
    released: FrameRelease
    holders: tuple[HolderRow, ...]  # biggest first (on the failing device, then in total)
    holders_cut: tuple[str, ...]  # roots whose holder walk ran out of budget: holders inside may be missing
    headroom: tuple[Headroom, ...]  # KV cache room of the loaded language models
    advice: tuple[str, ...]

    def to_dict(self) -> dict:
        return {
            "error": self.error,
            "message": self.message.to_dict(),
            "device": self.device,
            "free_bytes_now": self.free_bytes_now,
            "free_note": self.free_note,
            "released": self.released.to_dict(),
            "holders": [row.to_dict() for row in self.holders],
            "holders_cut": list(self.holders_cut),
            "headroom": [item.to_dict() for item in self.headroom],
            "advice": list(self.advice),
        }


def advise(
    message: OOMMessage, holders: tuple[HolderRow, ...], headroom: tuple[Headroom, ...], device: str | None
) -> tuple[str, ...]:
    """What to do, most specific first: drop hidden copies, unnamed and named holders, then generate smaller."""
    advice = []
    hidden = [row for row in holders if row.kind == HIDDEN]
    if hidden:
        where = ", ".join(row.path for row in hidden[:3])
        advice.append(f"%llmfree --hidden: drop the copies only output history or a traceback holds ({where}).")
    unnamed = [row for row in holders if row.kind == UNNAMED]
    if unnamed:
        held: dict[str, int] = {}
        for row in unnamed:
            for dev, nbytes in row.bytes_by_device.items():
                held[dev] = held.get(dev, 0) + nbytes
        advice.append(
            f"{format_by_device(held)} is held by objects no name reaches (a closure, a hook, another module): "
            "find and drop that reference, or restart the kernel."
        )
    named = [row for row in holders if row.kind == NAMED and (device is None or row.bytes_by_device.get(device))]
    if named:
        advice.append(f"%llmfree NAME for what you no longer need (biggest here: {', '.join(row.path for row in named[:3])}).")
    per_token = next((item for item in headroom if item.bytes_per_token), None)
    growth = f": {format_bytes(per_token.bytes_per_token)} per token for {per_token.name}" if per_token else ""
    advice.append(f"Lower the batch size or max_new_tokens; the KV cache grows with both{growth}.")
    advice.append("%%llmload MODEL to reload the model clean: it releases the old copy and its hidden copies first.")
    fragmented = message.reserved_unallocated_bytes
    if fragmented and message.requested_bytes and fragmented >= message.requested_bytes:
        advice.append(
            f"PyTorch holds {format_bytes(fragmented)} reserved but unallocated (fragmentation): start the kernel "
            "with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True."
        )
    return tuple(advice)



def rescue(shell, error: BaseException) -> OOMExplanation:
    """Release the failing frames of an OOM, then explain it."""
    from llm_magic.measure.memory import memory_snapshot
    from llm_magic.predict.gen_headroom import failed_inputs, model_headroom

    oom = find_oom(error) or error
    message = parse_oom_message(error_message(oom))
    failed = failed_inputs(error)  # before the frames are cleared: the sizes of the input that failed
    released = release_frames(shell, error)

    device = message.device or _current_device()
    snapshot = memory_snapshot()
    free_now, free_note = snapshot.usable_free(device) if device else (None, "the message names no device")
    # After the release, so that what the frames held is gone from the list.
    scan = scan_holders(visible_names(shell), hidden_refs(shell), find_orphans=True)
    holders = _rank_holders(scan.rows, device)
    # Encoders get no line: cut to MAX_MODELS after dropping them, so none takes a decoder's place.
    found = (model_headroom(model, name, snapshot, failed=failed.get(id(model))) for name, model in _language_models(shell))
    headroom = tuple(islice((item for item in found if item is not None), MAX_MODELS))
    return OOMExplanation(
        error=first_line(oom),
        message=message,
        device=device,
        free_bytes_now=free_now,
        free_note=free_note,
        released=released,
        holders=holders,
        holders_cut=scan.cut,
        headroom=headroom,
        advice=advise(message, holders, headroom, device),
    )


# -- the IPython hook -------------------------------------------------------------------------
