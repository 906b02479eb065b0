"""How an out-of-memory rescue (commands/oom.py) is shown below the failing cell's traceback,
in the styles of the other reports. rich is imported only when rendering.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llm_magic.engine.holders import HIDDEN, UNNAMED
from llm_magic.units import format_by_device, format_bytes

if TYPE_CHECKING:
    from llm_magic.commands.oom import FrameRelease, OOMExplanation
    from llm_magic.measure.headroom import Headroom

DEBUG_NOTE = (
    "The failing frames' locals were freed, so %debug will not see them; "
    "to keep them next time: %config LLMMagic.oom_rescue = False"
)


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
    """'Generation headroom of model (bfloat16, sdpa): the input that failed (batch 1 x 6,412 tokens, +256 new)
    needs 3.1 GiB more on cuda:0 than is free now; prompts up to 4,096 tokens fit'."""
    line = headroom.line
    unknown = headroom.generation is None or headroom.generation.max_prompt_tokens is None
    why = [note for note in (headroom.generation.notes if headroom.generation else headroom.notes) if note not in line]
    return line + (f" ({why[0]})" if unknown and why else "")


def _holders_table(explanation: OOMExplanation):
    from llm_magic.render.core import HIDDEN_STYLE, UNNAMED_STYLE, cut_note, new_table

    style = {HIDDEN: HIDDEN_STYLE, UNNAMED: UNNAMED_STYLE}
    table = new_table("What holds memory now", ("holder", "left"), ("kind", "left"), ("type", "left"), ("memory", "right"))
    for row in explanation.holders:
        table.add_row(row.path, row.kind, row.type_name, format_by_device(row.bytes_by_device), style=style.get(row.kind))
    if explanation.holders_cut:
        table.caption = cut_note(explanation.holders_cut)
        table.caption_justify = "left"
    return table


def render_oom(explanation: OOMExplanation):
    """A rich renderable: what failed, what came back, who holds memory, what to do."""
    from rich.text import Text

    from llm_magic.render.core import DIM, HEADING, OK, WARN, stack

    released = explanation.released
    parts: list[Any] = [Text(_failure_line(explanation), style=WARN)]
    parts.append(Text(_released_line(released), style=OK if released.freed_bytes else DIM))
    parts.append(Text(DEBUG_NOTE, style=DIM))
    parts += [Text(f"Not freed: {label}, still held by {'; '.join(held_by)}", style=WARN) for label, held_by in released.kept]
    parts.append(Text(_free_line(explanation)))
    parts.append(_holders_table(explanation) if explanation.holders else None)
    parts += [Text(_headroom_line(item)) for item in explanation.headroom]
    parts.append(Text("What to do:", style=HEADING))
    parts += [Text(f"  • {line}") for line in explanation.advice]
    return stack(parts)
