"""The `%gpustate` snapshot: memory per device, disk sources, holders, reconciliation."""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from llm_magic.render.core import (
    DIM,
    HEADING,
    HIDDEN_STYLE,
    UNNAMED_STYLE,
    WARN,
    cut_note,
    new_table,
    stack,
    warnings_panel,
    without_empty_columns,
)
from llm_magic.units import format_by_device, format_bytes


def _device_rows(memory) -> Table:
    rows = []
    for device in memory.devices:
        if device.device == "cpu":
            mine = f"RSS {format_bytes(device.rss_bytes)}"
            others = ""
        else:
            mine = f"{format_bytes(device.allocated_bytes)} alloc + {format_bytes(device.reserved_unused_bytes)} cached"
            others = format_bytes(device.other_bytes)
            if device.processes:
                others += f" ({len(device.processes)} proc)"
        label = device.device if not device.name or device.device == "cpu" else f"{device.device} {device.name}"
        rows.append(([label, format_bytes(device.total_bytes), format_bytes(device.free_bytes), mine, others, device.note or ""], None))
    columns = [("device", "left"), ("total", "right"), ("free", "right"), ("this process", "right"), ("others", "right"), ("note", "left")]
    return without_empty_columns("Memory", columns, rows)


_KIND_STYLE = {"named": None, "hidden": HIDDEN_STYLE, "unnamed": UNNAMED_STYLE}


def _holders_table(state) -> Table | Group | Text:
    rows = state.shown_holders()
    hidden_count = len(state.holders.rows) - len(rows)
    cut = cut_note(state.holders.cut) if state.holders.cut else ""
    if not rows:
        text = "Holders: no tensors are held by this process's Python objects"
        if hidden_count:
            text = f"Holders: {hidden_count} small holder(s) below {format_bytes(state.small_bytes)} not shown (%gpustate --all)"
        if cut:
            text += "; " + cut
        return Text(text, style=WARN if cut else DIM)
    cells = []
    for row in rows:
        shared = ""
        if row.shared_with:
            shared = f"{format_by_device(row.shared_by_device)} with {', '.join(row.shared_with[:2])}"
            if len(row.shared_with) > 2:
                shared += f" +{len(row.shared_with) - 2}"
        if row.also_held_by:
            shared = "; ".join(filter(None, [shared, "also in " + ", ".join(row.also_held_by)]))
        cells.append(([row.path, row.kind, row.type_name, format_by_device(row.bytes_by_device), shared], _KIND_STYLE.get(row.kind)))
    columns = [("holder", "left"), ("kind", "left"), ("type", "left"), ("memory", "right"), ("shared / also in", "left")]
    table = without_empty_columns("Holders", columns, cells)
    notes = []
    if hidden_count:
        notes.append(f"{hidden_count} small holder(s) below {format_bytes(state.small_bytes)} not shown: %gpustate --all")
    if not state.holders.orphans_searched:
        notes.append("unnamed holders not searched: %gpustate --deep")
    if notes:
        table.caption = "; ".join(notes)
        table.caption_justify = "left"
    # A line of its own, not the caption: the table is narrow and would wrap it.
    return Group(table, Text(cut, style=WARN)) if cut else table


def _reconciliation_lines(state) -> Text:
    lines = Text()
    for line in state.reconciliation:
        explained = format_bytes(line.explained_bytes)
        if line.reported_bytes is None:
            lines.append(f"{line.device}: holders explain {explained}; {line.reported_by} unknown\n", style=DIM)
            continue
        rest = line.unexplained_bytes
        if line.device == "cpu":
            lines.append(
                f"cpu: tensors explain {explained} of {format_bytes(line.reported_bytes)} {line.reported_by}; "
                f"the other {format_bytes(rest)} is the interpreter, libraries and non-tensor objects\n",
                style=DIM,
            )
        else:
            style = WARN if rest and rest > (1 << 20) else DIM
            lines.append(
                f"{line.device}: holders explain {explained} of {format_bytes(line.reported_bytes)} {line.reported_by}; "
                f"unexplained {format_bytes(rest)}" + (" (autograd graphs, C++ caches or unnamed holders: %gpustate --deep)" if style == WARN else "") + "\n",
                style=style,
            )
    lines.rstrip()
    return lines


def _disk_table(disk) -> Table | None:
    if not disk:
        return None
    table = new_table("Disk (offloaded weights are read from here)", ("path", "left"), ("kind", "left"), ("size", "right"))
    for source in disk:
        table.add_row(source.path, source.kind, format_bytes(source.nbytes))
    return table


def render_gpustate(state) -> Group:
    memory = state.memory
    parts: list[Any] = [Text("%gpustate", style=HEADING)]
    parts.append(warnings_panel(state.flags))
    parts.append(_device_rows(memory))
    if not memory.cuda_devices:
        parts.append(Text(f"CUDA: {memory.cuda_state}", style=DIM))
    parts.append(_disk_table(state.disk))
    parts.append(_holders_table(state))
    parts.append(_reconciliation_lines(state))
    return stack(parts)
