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
   into an `oom_report.OOMExplanation`, and shows it below the traceback.

torch is never imported here: an OOM from torch means torch is already loaded.
"""

from __future__ import annotations

import re
import sys
import types
from dataclasses import dataclass
from typing import Any, Callable

from .holders import HolderRow, scan_holders
from .oom_report import OOMExplanation, advise
from .release import HiddenRef, Target, release
from .shellrefs import clear_traceback_frames, frame_roots, hidden_refs, naming_roots, visible_names
from .tensors import Footprint, find_tensor_holders, loaded_torch
from .walk import WalkStats, instance_dict

OOM_TEXT = "out of memory"
MAX_HOLDERS = 6  # holders listed in the explanation, biggest first
MAX_MODELS = 3  # models given a generation-headroom line


# -- recognising an OOM -----------------------------------------------------------------------


def _exception_chain(error: BaseException | None) -> list[BaseException]:
    """The error, then its causes and contexts (an OOM re-raised as another error counts)."""
    chain: list[BaseException] = []
    pending = [error]
    while pending:
        exc = pending.pop(0)
        if isinstance(exc, BaseException) and all(exc is not seen for seen in chain):
            chain.append(exc)
            pending += [exc.__cause__, exc.__context__]
    return chain


def _oom_types(torch: Any) -> tuple[type, ...]:
    # torch.OutOfMemoryError since 2.5 (torch.cuda.OutOfMemoryError is the same class there);
    # older torch has only the cuda one.
    found = [getattr(torch, "OutOfMemoryError", None), getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)]
    return tuple(kind for kind in found if isinstance(kind, type))


def _message(error: BaseException) -> str:
    try:
        return str(error)
    except Exception:  # an exception whose __str__ fails still failed the cell
        return ""


def is_oom(error: BaseException) -> bool:
    """Is this exception itself an out-of-memory error from torch (by its real type)?"""
    torch = loaded_torch()
    if torch is None:
        return False  # no torch, no torch OOM: nothing of ours to explain
    kind = type(error)  # not error.__class__, which an object can fake
    if issubclass(kind, _oom_types(torch)):
        return True
    return issubclass(kind, RuntimeError) and OOM_TEXT in _message(error).lower()


def find_oom(error: BaseException | None) -> BaseException | None:
    """The OOM a failed cell died of: the error itself or one in its cause/context chain."""
    for exc in _exception_chain(error):
        if is_oom(exc):
            return exc
    return None


# -- PyTorch's message ----------------------------------------------------------------------

_SIZE = r"([\d.]+)\s*(bytes|B|KiB|MiB|GiB|TiB|KB|MB|GB|TB)\b"
_UNITS = {"bytes": 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}
# PyTorch's MPS allocator writes KB/MB/GB for binary multiples, like its other allocators.
_UNITS.update({"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40})
_DEVICE_KINDS = {"cuda": "cuda", "xpu": "xpu", "mps": "mps", "mlu": "mlu", "hip": "cuda"}


@dataclass(frozen=True)
class OOMMessage:
    """Figures PyTorch put in its message, at the moment the allocation failed. None: not said."""

    device: str | None  # "cuda:0", "mps", ...
    requested_bytes: int | None
    total_bytes: int | None
    free_bytes: int | None  # driver free on the device, all processes
    allocated_bytes: int | None  # by PyTorch in this process
    reserved_unallocated_bytes: int | None  # PyTorch's cache: fragmentation when large

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _size(text: str, *patterns: str) -> int | None:
    """Bytes of the first pattern that matches (SIZE marks the figure); 0 is a figure too."""
    for pattern in patterns:
        match = re.search(pattern.replace("SIZE", _SIZE), text)
        if match is None:
            continue
        number, unit = match.group(match.lastindex - 1), match.group(match.lastindex)
        try:
            return int(float(number) * _UNITS[unit])
        except (ValueError, KeyError):
            continue
    return None


def _device(text: str) -> str | None:
    kind = re.match(r"\s*(?:\w+:\s*)?(CUDA|XPU|MPS|MLU|HIP)\b", text, re.IGNORECASE)
    name = _DEVICE_KINDS.get(kind.group(1).lower()) if kind else None
    # 2.1+: ". GPU 0 has a total capacity"; before: "(GPU 0; 7.79 GiB total capacity".
    index = re.search(r"(?:GPU|Device|MLU) (\d+)(?: has a total capacity|;)", text)
    if name == "mps":
        return "mps"
    if index is not None:
        return f"{name or 'cuda'}:{index.group(1)}"
    return None


def parse_oom_message(text: str) -> OOMMessage:
    """Read PyTorch's OOM message (2.1+ wording, and the older one); missing figures are None."""
    reserved_total = _size(text, r"SIZE reserved in total by PyTorch")  # before 2.1
    allocated = _size(text, r"Of the allocated memory SIZE is allocated by PyTorch", r"SIZE already allocated")
    unallocated = _size(text, r"and SIZE is reserved by PyTorch but unallocated")
    if unallocated is None and reserved_total is not None and allocated is not None:
        unallocated = max(reserved_total - allocated, 0)
    return OOMMessage(
        device=_device(text),
        requested_bytes=_size(text, r"Tried to allocate SIZE"),
        total_bytes=_size(text, r"total capacity of SIZE", r"SIZE total capacity"),
        free_bytes=_size(text, r"of which SIZE ?is free", r"; SIZE free;"),
        allocated_bytes=allocated,
        reserved_unallocated_bytes=unallocated,
    )


def _first_line(error: BaseException) -> str:
    text = f"{type(error).__name__}: {_message(error)}"
    return text.splitlines()[0][:300] if text else type(error).__name__


# -- releasing the failing traceback's frames ----------------------------------------------


def _tracebacks(shell, error: BaseException) -> list[types.TracebackType]:
    """The failing cell's tracebacks: its exception chain's, and the same in sys and IPython."""
    chain = _exception_chain(error)
    found = [exc.__traceback__ for exc in chain]
    # IPython stored this cell's error there; anything else there is not ours to clear.
    if any(getattr(sys, "last_value", None) is exc for exc in chain):
        found.append(getattr(sys, "last_traceback", None))
    found.append(getattr(getattr(shell, "InteractiveTB", None), "tb", None))
    unique: list[types.TracebackType] = []
    for tb in found:
        if isinstance(tb, types.TracebackType) and all(tb is not seen for seen in unique):
            unique.append(tb)
    return unique


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
    tracebacks = _tracebacks(shell, error)
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
    from .placement import find_model

    found: list[tuple[str, Any]] = []
    for name, value in visible_names(shell):
        model = find_model(value)
        if model is None or any(model is other for _, other in found):
            continue
        if (instance_dict(model) or {}).get("config") is not None:
            found.append((name if model is value else f"{name}.model", model))
    return found


def rescue(shell, error: BaseException) -> OOMExplanation:
    """Release the failing frames of an OOM, then explain it."""
    from .devices import memory_snapshot
    from .headroom import generation_headroom

    oom = find_oom(error) or error
    message = parse_oom_message(_message(oom))
    released = release_frames(shell, error)

    device = message.device or _current_device()
    snapshot = memory_snapshot()
    free_now, free_note = snapshot.usable_free(device) if device else (None, "the message names no device")
    # After the release, so that what the frames held is gone from the list.
    scan = scan_holders(visible_names(shell), hidden_refs(shell), find_orphans=True)
    holders = _rank_holders(scan.rows, device)
    headroom = tuple(generation_headroom(model, name, snapshot) for name, model in _language_models(shell)[:MAX_MODELS])
    return OOMExplanation(
        error=_first_line(oom),
        message=message,
        device=device,
        free_bytes_now=free_now,
        free_note=free_note,
        released=released,
        holders=holders,
        holders_truncated=scan.truncated,
        headroom=headroom,
        advice=advise(message, holders, headroom, device),
    )


# -- the IPython hook -------------------------------------------------------------------------


class OOMRescue:
    """A `post_run_cell` callback that rescues and explains cells that died of an OOM.

    `enabled` is asked after every failed cell (the `LLMMagic.oom_rescue` setting), so turning
    it off needs no re-registration. `show` displays the renderable (default: render.show).
    """

    def __init__(self, shell, enabled: Callable[[], bool] = lambda: True, *, show: Callable[[Any], None] | None = None) -> None:
        self.shell = shell
        self.enabled = enabled
        self._show = show
        self.last_explanation: OOMExplanation | None = None  # plain data: holds no tensor
        # One bound method, kept: IPython finds it again by equality to unregister it.
        self._callback = self.post_run_cell

    @property
    def registered(self) -> bool:
        return self._callback in self.shell.events.callbacks["post_run_cell"]

    def register(self) -> None:
        # Appended after IPython's own callbacks; IPython prints the traceback before any of them.
        self.shell.events.register("post_run_cell", self._callback)

    def unregister(self) -> None:
        if self.registered:
            self.shell.events.unregister("post_run_cell", self._callback)

    def post_run_cell(self, result) -> None:
        error = getattr(result, "error_in_exec", None)
        if error is None or not self.enabled() or find_oom(error) is None:
            return
        try:
            from .oom_report import render_oom
            from .render import show

            self.last_explanation = rescue(self.shell, error)
            (self._show or show)(render_oom(self.last_explanation))
        except Exception as failure:  # noqa: BLE001
            # Raising here would make IPython show *our* traceback and store it as the last
            # exception, hiding the user's OOM from %debug and %tb: say it in one line instead.
            print(f"llm_magic: the out-of-memory rescue failed: {type(failure).__name__}: {failure}", file=sys.stderr)
