"""The `%llmfit` report: the longest prompt that fits, each device's room, the items that will not fit."""

from __future__ import annotations

from typing import Any

from llm_magic.units import device_sort_key, format_bytes

MAX_ROWS = 20  # failing items listed; the JSON has them all


def headline(report) -> str:
    """'model (LlamaForCausalLM, sdpa): prompts up to 4,096 tokens fit at batch 4 with 256 new tokens
    (context window 8,192)'."""
    context = f"context window {report.context_window:,}" if report.context_window else "context window unknown"
    what = f"{report.model} ({report.class_name}, {report.attention})"
    new = f"{report.max_new_tokens:,} new tokens"
    if report.max_prompt_tokens < 1:
        return f"{what}: no prompt fits at batch {report.batch} with {new} ({context})"
    limit = f"prompts up to {report.max_prompt_tokens:,} tokens fit at batch {report.batch} with {new}"
    if report.binding_device:
        limit += f"; longer ones run out of memory on {report.binding_device}"
    return f"{what}: {limit} ({context})"


def _device_rows(report) -> list[list[str]]:
    rows = []
    for device in sorted(report.capacity_bytes, key=device_sort_key):
        worst = max((item.peak_bytes.get(device, 0) for item in report.items), default=None)
        rows.append([
            device,
            format_bytes(report.weights_bytes.get(device, 0)),
            f"{format_bytes(report.capacity_bytes[device])} ({report.capacity_from[device]})",
            format_bytes(worst) if worst is not None else "",
        ])
    return rows


def _item_rows(report) -> list[list[str]]:
    rows = []
    for item in report.failing[:MAX_ROWS]:
        if not item.missing_bytes:
            rows.append([str(item.index), f"{item.tokens:,}", f"{item.batch_tokens:,}", "context", "too long"])
            continue
        device = max(item.missing_bytes, key=item.missing_bytes.get)
        rows.append([str(item.index), f"{item.tokens:,}", f"{item.batch_tokens:,}", device,
                     format_bytes(item.missing_bytes[device])])
    return rows


def summary_lines(report) -> list[str]:
    lines = [headline(report)]
    items = len(report.items)
    if items:
        failing = len(report.failing)
        lines.append(f"{items - failing} of {items} prompts fit" + ("." if not failing else f"; {failing} will not."))
    if report.first_failing:
        lines.append(report.first_failing)
    return lines


def render_fit(report) -> Any:
    from rich.text import Text

    from llm_magic.render.core import DIM, HEADING, OK, WARN, new_table, stack

    parts: list[Any] = [Text(f"%llmfit {report.model}", style=HEADING)]
    lines = summary_lines(report)
    parts.append(Text(lines[0], style="bold"))
    parts += [Text(line, style=WARN if report.failing else OK) for line in lines[1:]]
    devices = new_table("Memory per device", ("device", "left"), ("weights", "right"), ("capacity", "right"),
                        ("worst batch peak", "right"))
    for row in _device_rows(report):
        devices.add_row(*row)
    parts.append(devices)
    if report.failing:
        table = new_table("Items that will not fit", ("item", "right"), ("tokens", "right"), ("padded to", "right"),
                          ("device", "left"), ("missing", "right"))
        for row in _item_rows(report):
            table.add_row(*row, style=WARN)
        if len(report.failing) > MAX_ROWS:
            table.caption = f"{len(report.failing) - MAX_ROWS} more: %llmfit ... --json lists them all"
            table.caption_justify = "left"
        parts.append(table)
    parts += [Text(f"note: {note}", style=DIM) for note in report.notes]
    parts.append(Text(f"{report.simulations} fake generate runs, {report.seconds:.2f} s, no real memory", style=DIM))
    return stack(parts)
