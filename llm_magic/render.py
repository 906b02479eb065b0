"""Rendering reports with rich: a coloured table in a terminal, HTML in a notebook.

This module holds the shared pieces (styles, `new_table`, `stack`, `mimebundle`, `show`) and the
renderers of the magics' reports; `oom_report.py` renders the OOM explanation with the same
pieces. Every function takes plain report data and returns a rich renderable; nothing here
measures or changes anything.
"""

from __future__ import annotations

from typing import Any, Iterable

from rich import box
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from .units import device_sort_key, format_by_device, format_bytes

# Explicit colours that keep a 3:1 contrast on light and dark notebook themes alike (rich's
# named "red" exports as #800000, unreadable on a dark background).
WARN = "bold #d32f2f"
OK = "#2e7d32"
HEADING = "bold #00838f"
HIDDEN_STYLE = "#b26a00"
UNNAMED_STYLE = "#8e24aa"
DIM = "dim"


def new_table(title: str, *columns: tuple[str, str]) -> Table:
    # min_width keeps a short table from wrapping its own title.
    # SIMPLE_HEAD without edges: no blank lines around the rows, so a report stays compact.
    table = Table(
        title=title, title_justify="left", title_style="bold", box=box.SIMPLE_HEAD, show_edge=False,
        pad_edge=False, min_width=min(len(title) + 2, 100),
    )
    for name, justify in columns:
        table.add_column(name, justify=justify, no_wrap=justify == "right")
    return table


def stack(parts: Iterable[Any]) -> Group:
    """Sections one under the other, a blank line before each table so titles stand apart."""
    stacked: list[Any] = []
    for part in parts:
        if part is None:
            continue
        if stacked and isinstance(part, (Table, Panel)):
            stacked.append(Text(""))
        stacked.append(part)
    return Group(*stacked)


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
    if released.also_cleared:
        parts.append(Text("Hidden copies dropped (the objects are still named): " + ", ".join(released.also_cleared), style=DIM))
    if not released.dry_run:
        freed = format_by_device(released.freed_bytes) if released.freed_bytes else "nothing"
        parts.append(Text(f"Freed: {freed}", style=OK if released.freed_bytes else DIM))
    return stack(parts)


def placement_table(placement, predicted: dict[str, int] | None = None) -> Table:
    columns = [("device", "left"), ("modules", "right"), ("bytes", "right"), ("share", "right")]
    if predicted is not None:
        columns.append(("predicted", "right"))
    title = f"{placement.name}: {placement.class_name}, {format_bytes(placement.total_bytes)}"
    table = new_table(title, *columns)
    for row in placement.rows:
        slow = row.device in ("cpu", "disk") and placement_has_accelerator(placement) or row.device == "disk"
        style = WARN if slow else None
        cells = [row.device, str(row.modules), format_bytes(row.nbytes), f"{row.share:.0%}"]
        if predicted is not None:
            cells.append(format_bytes(predicted.get(row.device, 0)))
        table.add_row(*cells, style=style)
    return table


def placement_has_accelerator(placement) -> bool:
    return any(row.device.split(":")[0] not in ("cpu", "disk", "meta") for row in placement.rows)


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


def kept_table(kept: Iterable) -> Table | None:
    kept = list(kept)
    if not kept:
        return None
    table = new_table("Still loaded (kept: not replaced by this cell)", ("name", "left"), ("type", "left"), ("memory", "right"))
    for holder in kept:
        table.add_row(holder.path, holder.type_name.rsplit(".", 1)[-1], format_by_device(holder.bytes_by_device))
    table.caption = "free them with %llmfree NAME ..., or reload with %%llmload --release-all"
    table.caption_justify = "left"
    return table


def warnings_panel(warnings: Iterable[str]) -> Panel | None:
    warnings = list(warnings)
    if not warnings:
        return None
    body = Text("\n".join(f"⚠ {w}" for w in warnings), style=WARN)
    return Panel(body, title="Warning", title_align="left", border_style="red", box=box.HEAVY)


def prediction_table(item) -> Table | Text:
    p = item.prediction
    name = item.target or p.model_id or "model"
    if p.status != "ok" or not p.bytes_by_device:
        why = "; ".join(p.notes) or p.status
        return Text(f"Predicted placement of {name}: unknown ({why})", style=DIM)
    title = f"Predicted placement of {name}: {p.model_class}, {format_bytes(p.total_bytes)} in {p.dtype}"
    table = new_table(title, ("device", "left"), ("modules", "right"), ("bytes", "right"), ("share", "right"))
    counts: dict[str, int] = {}
    for device in (p.device_map or {}).values():
        counts[device] = counts.get(device, 0) + 1
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
    heading = f"%%llmload {report.model_name}" + ("  (dry run: nothing released, nothing loaded)" if report.dry_run else "")
    parts.append(Text(heading, style=HEADING))
    parts.append(warnings_panel(report.warnings))
    parts.append(released_table(report.released))
    if report.dry_run:
        parts.extend(prediction_table(item) for item in report.predictions)
    for placement in report.models:
        parts.append(placement_table(placement, _predicted_for(report, placement.name)))
    for headroom in report.headroom:
        parts.append(Text(f"Generation headroom: {headroom}", style="bold"))
    parts.append(kept_table(report.kept))
    parts.append(memory_table(report.memory_before, report.memory_after))
    if report.error:
        parts.append(Text(f"The cell raised {report.error} (traceback below).", style=WARN))
    return stack(parts)


def mimebundle(renderable, width: int = 110) -> dict[str, str]:
    """text/plain (no colour codes) and text/html (inline styles) for one renderable."""
    # force_jupyter=False: in a kernel, a recording console would otherwise display its own copy.
    console = Console(
        record=True, width=width, file=_Discard(), color_system="truecolor", force_terminal=True, force_jupyter=False
    )
    console.print(renderable)
    html = console.export_html(inline_styles=True, code_format=_HTML_FORMAT, clear=False)
    text = console.export_text(clear=True, styles=False)
    return {"text/plain": text, "text/html": html}


_HTML_FORMAT = (
    '<pre class="llm-magic" style="white-space:pre;overflow-x:auto;line-height:1.35;'
    "font-family:Menlo,'DejaVu Sans Mono',Consolas,'Courier New',monospace;font-size:13px\">"
    "<code>{code}</code></pre>"
)


class _Discard:
    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


def show(renderable) -> None:
    """Print in a terminal (with colour when it is one); display HTML in a notebook."""
    if _in_kernel():
        from IPython.display import display

        display(mimebundle(renderable), raw=True)
    else:
        Console().print(renderable)


def _in_kernel() -> bool:
    # rich's own test reads the builtin `get_ipython`, which IPython sets only while a cell
    # runs: from a post_run_cell callback the HTML would come out as ANSI text.
    from IPython import get_ipython

    shell = get_ipython()
    return shell is not None and (type(shell).__name__ == "ZMQInteractiveShell" or "google.colab" in type(shell).__module__)


def _without_empty_columns(title: str, columns: list[tuple[str, str]], rows: list[tuple[list, Any]]) -> Table:
    """A table of `rows` ((cells, style) pairs) leaving out columns that are empty in every row."""
    keep = [i for i in range(len(columns)) if any(cells[i] for cells, _ in rows)]
    table = new_table(title, *(columns[i] for i in keep))
    for cells, style in rows:
        table.add_row(*(cells[i] for i in keep), style=style)
    return table


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
    return _without_empty_columns("Memory", columns, rows)


_KIND_STYLE = {"named": None, "hidden": HIDDEN_STYLE, "unnamed": UNNAMED_STYLE}


def _holders_table(state) -> Table | Text:
    rows = state.shown_holders()
    hidden_count = len(state.holders.rows) - len(rows)
    if not rows:
        text = "Holders: no tensors are held by this process's Python objects"
        if hidden_count:
            text = f"Holders: {hidden_count} small holder(s) below {format_bytes(state.small_bytes)} not shown (%gpustate --all)"
        return Text(text, style=DIM)
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
    table = _without_empty_columns("Holders", columns, cells)
    notes = []
    if hidden_count:
        notes.append(f"{hidden_count} small holder(s) below {format_bytes(state.small_bytes)} not shown: %gpustate --all")
    if not state.holders.orphans_searched:
        notes.append("unnamed holders not searched: %gpustate --deep")
    if state.holders.truncated:
        notes.append("the namespace walk hit its budget: some holders may be missing")
    if notes:
        table.caption = "; ".join(notes)
        table.caption_justify = "left"
    return table


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
