"""What an out-of-memory rescue found, and how it is shown below the failing cell's traceback.

`OOMExplanation` is plain data (`oom.rescue` fills it in after clearing the failing frames);
`advise` turns its figures into what to do; `render_oom` makes a rich renderable of it, in the
styles of the other reports. rich is imported only when rendering.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .holders import HIDDEN, NAMED, UNNAMED, HolderRow
from .units import format_by_device, format_bytes

if TYPE_CHECKING:
    from .headroom import Headroom
    from .oom import FrameRelease, OOMMessage


@dataclass(frozen=True)
class OOMExplanation:
    error: str  # "OutOfMemoryError: CUDA out of memory. Tried to allocate ..." (first line)
    message: OOMMessage  # figures at the moment of failure
    device: str | None  # the device that ran out, when known
    free_bytes_now: int | None  # measured after the rescue; None: unknown
    free_note: str | None  # why free_bytes_now is unknown
    released: FrameRelease
    holders: tuple[HolderRow, ...]  # biggest first (on the failing device, then in total)
    holders_truncated: bool  # the holder walk ran out of budget: some may be missing
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
            "holders_truncated": self.holders_truncated,
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


# -- rendering --------------------------------------------------------------------------------


def _failure_line(explanation: OOMExplanation) -> str:
    message = explanation.message
    where = f" on {explanation.device}" if explanation.device else ""
    parts = []
    if message.requested_bytes is not None:
        parts.append(f"tried to allocate {format_bytes(message.requested_bytes)}")
    if message.free_bytes is not None:
        total = f" of {format_bytes(message.total_bytes)}" if message.total_bytes is not None else ""
        parts.append(f"{format_bytes(message.free_bytes)} was free{total}")
    if not parts:  # a message with no figures ("CUDA error: out of memory")
        return f"Out of memory{where} ({explanation.error}); the message gives no sizes."
    return f"Out of memory{where}: " + ", ".join(parts) + "."


def _released_line(released: FrameRelease) -> str:
    if released.freed_bytes:
        more = f" and {len(released.freed) - 3} more" if len(released.freed) > 3 else ""
        held = ", ".join(released.freed[:3]) + more
        return f"Freed now: {format_by_device(released.freed_bytes)}, held only by the failing traceback ({held})."
    return "Cleared the failing traceback's frames: they held no tensor that is not held elsewhere."


def _free_line(explanation: OOMExplanation) -> str:
    device = explanation.device or "the device"
    unknown = explanation.free_bytes_now is None and explanation.free_note
    return f"Free on {device} now: {format_bytes(explanation.free_bytes_now)}" + (f" ({explanation.free_note})" if unknown else "")


def _headroom_line(headroom: Headroom) -> str:
    """'Generation headroom of model (bfloat16): KV cache 128 KiB/token on cuda:0: ~61,000 tokens fit at batch 1'."""
    dtype = f" ({headroom.dtype})" if headroom.dtype else ""
    line = f"Generation headroom of {headroom.name}{dtype}: {headroom.summary}"
    unknown = any(fit.tokens is None and not fit.unlimited for fit in headroom.fits)
    why = [note for note in headroom.notes if note not in headroom.summary]
    return line + (f" ({why[0]})" if unknown and why else "")


def _holders_table(explanation: OOMExplanation):
    from .render import HIDDEN_STYLE, UNNAMED_STYLE, new_table

    style = {HIDDEN: HIDDEN_STYLE, UNNAMED: UNNAMED_STYLE}
    table = new_table("What holds memory now", ("holder", "left"), ("kind", "left"), ("type", "left"), ("memory", "right"))
    for row in explanation.holders:
        table.add_row(row.path, row.kind, row.type_name, format_by_device(row.bytes_by_device), style=style.get(row.kind))
    if explanation.holders_truncated:
        table.caption = "the search ran out of budget: some holders may be missing"
        table.caption_justify = "left"
    return table


def render_oom(explanation: OOMExplanation):
    """A rich renderable: what failed, what came back, who holds memory, what to do."""
    from rich.text import Text

    from .render import DIM, HEADING, OK, WARN, stack

    released = explanation.released
    parts: list[Any] = [Text(_failure_line(explanation), style=WARN)]
    parts.append(Text(_released_line(released), style=OK if released.freed_bytes else DIM))
    parts += [Text(f"Not freed: {label}, still held by {'; '.join(held_by)}", style=WARN) for label, held_by in released.kept]
    parts.append(Text(_free_line(explanation)))
    parts.append(_holders_table(explanation) if explanation.holders else None)
    parts += [Text(_headroom_line(item)) for item in explanation.headroom]
    parts.append(Text("What to do:", style=HEADING))
    parts += [Text(f"  • {line}") for line in explanation.advice]
    return stack(parts)
