"""The `%%llmload` report: placement per model beside its prediction, what was kept, free memory."""

from __future__ import annotations

from typing import Any, Iterable

from rich.console import Group
from rich.table import Table
from rich.text import Text

from llm_magic.names import device_sort_key
from llm_magic.render.core import (
    DIM,
    HEADING,
    WARN,
    Clauses,
    cut_note,
    new_table,
    stack,
    warnings_panel,
)
from llm_magic.render.release import released_table
from llm_magic.units import format_by_device, format_bytes


def placement_table(placement, predicted: dict[str, int] | None = None, *, accelerator_present: bool = False) -> Table:
    """The placement of one loaded model. Rows on a slower tier are highlighted: disk always, cpu
    when the machine has an accelerator (`accelerator_present`: the same machine-level answer
    as the slow-tier warning; a model wholly on cpu next to an idle GPU is highlighted too)."""
    columns = [("device", "left"), ("modules", "right"), ("bytes", "right"), ("share", "right")]
    if predicted is not None:
        columns.append(("predicted", "right"))
    title = f"{placement.name}: {placement.class_name}, {format_bytes(placement.total_bytes)}"
    table = new_table(title, *columns)
    for row in placement.rows:
        style = WARN if row.device in placement.offloaded_devices(accelerator_present) else None
        cells = [row.device, str(row.modules), format_bytes(row.nbytes), f"{row.share:.0%}"]
        if predicted is not None:
            cells.append(format_bytes(predicted.get(row.device, 0)))
        table.add_row(*cells, style=style)
    return table


def memory_table(before, after) -> Table | None:
    if before is None and after is None:
        return None
    table = new_table("Free memory", ("device", "left"), ("before", "right"), ("after", "right"), ("change (system-wide)", "right"))
    before_free = {d.device: d.free_bytes for d in getattr(before, "devices", ())}
    after_free = {d.device: d.free_bytes for d in getattr(after, "devices", ())}
    for device in sorted(set(before_free) | set(after_free), key=device_sort_key):
        old, new = before_free.get(device), after_free.get(device)
        change = format_bytes(new - old) if old is not None and new is not None else "unknown"
        table.add_row(device, format_bytes(old), format_bytes(new), change)
    return table


def kept_table(kept: Iterable, cut: tuple[str, ...] = ()) -> Table | Group | Text | None:
    kept = list(kept)
    # A line of its own, not the caption: the table is narrow and would wrap it.
    note = Text(f"Still loaded: {cut_note(cut, 'models')}", style=WARN) if cut else None
    if not kept:
        return note
    table = new_table("Still loaded (kept: not replaced by this cell)", ("name", "left"), ("type", "left"), ("memory", "right"))
    for holder in kept:
        table.add_row(holder.path, holder.type_name.rsplit(".", 1)[-1], format_by_device(holder.bytes_by_device))
    table.caption = "free them with %llmfree NAME ..., or reload with %%llmload --release-all"
    table.caption_justify = "left"
    return Group(table, note) if cut else table


def prediction_table(item) -> Table | Text:
    p = item.prediction
    name = item.target or p.model_id or "model"
    if p.status != "ok" or not p.bytes_by_device:
        why = "; ".join(p.notes) or p.status
        return Text(f"Predicted placement of {name}: unknown ({why})", style=DIM)
    title = f"Predicted placement of {name}: {p.model_class}, {format_bytes(p.total_bytes)} in {p.dtype}"
    table = new_table(title, ("device", "left"), ("modules", "right"), ("bytes", "right"), ("share", "right"))
    counts = p.modules_by_device or {}
    for device in sorted(p.bytes_by_device, key=device_sort_key):
        nbytes = p.bytes_by_device[device]
        style = WARN if p.best_device and device != p.best_device else None
        share = nbytes / p.total_bytes if p.total_bytes else 0.0
        table.add_row(device, str(counts.get(device, "")), format_bytes(nbytes), f"{share:.0%}", style=style)
    notes = [n for n in p.notes if n]
    if notes:
        table.caption = "; ".join(notes)
        table.caption_justify = "left"
    return table


def _predicted_for(report, name: str) -> dict[str, int] | None:
    for item in report.predictions:
        if item.target == name and item.prediction.status == "ok":
            return item.prediction.bytes_by_device
    return None


def render_load_report(report) -> Group:
    parts: list[Any] = []
    heading = f"{report.magic} {report.model_name}" + ("  (dry run: nothing released, nothing loaded)" if report.dry_run else "")
    parts.append(Text(heading, style=HEADING))
    parts.append(warnings_panel(report.warnings))
    parts.append(released_table(report.released))
    parts += [Text(f"kept `{name}`: the cell reads it before rebinding it", style=DIM) for name in report.kept_for_reads]
    if report.dry_run:
        for item in report.predictions:
            parts.append(prediction_table(item))
            if item.prediction.generation is not None:  # the predicted placement's headroom
                parts.append(Clauses(item.prediction.generation.line, style="bold"))
    accelerator = bool(getattr(report.memory_after, "accelerator_present", False))
    for placement in report.models:
        parts.append(placement_table(placement, _predicted_for(report, placement.name), accelerator_present=accelerator))
        parts += [
            Text(f"{item.name} shares {format_by_device(item.bytes_by_device)} with {item.shared_with}: the same weights, counted once in memory", style=DIM)
            for item in report.shared
            if item.name == placement.name
        ]
    for headroom in report.headroom:
        parts.append(Clauses(headroom.line, style="bold"))
    parts.append(kept_table(report.kept, report.kept_cut))
    parts.append(memory_table(report.memory_before, report.memory_after))
    if report.load_failure:
        parts.append(Text(f"The load failed: {report.load_failure} (traceback below).", style=WARN))
    elif report.error:
        parts.append(Text(f"The cell raised {report.error} (traceback below).", style=WARN))
    return stack(parts)
