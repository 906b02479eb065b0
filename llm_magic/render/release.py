"""What a release did (or, in a dry run, would do): `%llmfree` and the top of `%%llmload`."""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from llm_magic.engine.walk import SEARCH_EVERYTHING, cut_names
from llm_magic.render.core import DIM, HEADING, OK, WARN, new_table, stack
from llm_magic.units import format_by_device


def released_table(released, nothing: str = "no existing object held tensors the cell replaces") -> Table | Text:
    if not released.released:
        return Text(f"Released: nothing ({nothing}).", style=DIM)
    table = new_table("Released", ("object", "left"), ("type", "left"), ("memory", "right"), ("references dropped", "left"), ("status", "left"))
    for item in released.released:
        if released.dry_run:
            status = Text("would be released", style=DIM)
        elif item.freed:
            status = Text("freed ✓", style=OK)
        else:
            status = Text("NOT freed: held by " + "; ".join(item.held_by), style=WARN)
        table.add_row(item.label, item.type_name.rsplit(".", 1)[-1], format_by_device(item.bytes_by_device), ", ".join(item.cleared), status)
    return table


def render_release(released, heading: str) -> Group:
    """What `%llmfree` did (or, in a dry run, would do)."""
    parts: list[Any] = [Text(heading + ("  (dry run: nothing released)" if released.dry_run else ""), style=HEADING)]
    parts.append(released_table(released, nothing="no object matched"))
    if released.cut:
        parts.append(
            Text(
                f"Searched only in part (too many objects): {cut_names(released.cut)} — what they hold was not released; "
                f"{SEARCH_EVERYTHING}",
                style=WARN,
            )
        )
    if released.also_cleared:
        parts.append(Text("Hidden copies dropped (the objects are still named): " + ", ".join(released.also_cleared), style=DIM))
    if not released.dry_run:
        freed = format_by_device(released.freed_bytes) if released.freed_bytes else "nothing"
        parts.append(Text(f"Freed: {freed}", style=OK if released.freed_bytes else DIM))
    return stack(parts)
