"""The one-line messages of watch mode and guard mode."""

from __future__ import annotations

from llm_magic.units import format_bytes


def placement_line(placement, accelerator_present: bool) -> str:
    """`model (LlamaForCausalLM, 1.2 GiB): 28 modules cuda:0, 15 cpu ⚠ slower tier: cpu`."""
    rows = [row for row in placement.rows if row.modules or row.nbytes]
    parts = [f"{row.modules} {'module' if row.modules == 1 else 'modules'} {row.device}" for row in rows[:1]]
    parts += [f"{row.modules} {row.device}" for row in rows[1:]]
    line = f"{placement.name} ({placement.class_name}, {format_bytes(placement.total_bytes)}): {', '.join(parts) or 'no weights'}"
    if placement.slow_tier_warning(accelerator_present):
        line += " ⚠ slower tier: " + ", ".join(placement.offloaded_devices(accelerator_present))
    return line


GUARD_OFF = "`%llmguard off` to stop"


def guard_release_lines(event) -> list[str]:
    """Guard's lines before a cell's own output: only when it released, kept or blocked something.

    "released `model` (13.2 GiB cuda:0; also in Out[3], last traceback) before this cell loads a
    new one — `%llmguard off` to stop".
    """
    from llm_magic.units import format_by_device

    lines = [f"guard: kept `{name}`: the cell reads it before rebinding it" for name in event.kept_for_reads]
    lines += [f"guard: released nothing: {reason}" for reason in event.blocked]
    for item in event.released.released if event.released is not None else ():
        memory = format_by_device(item.bytes_by_device)
        also = [label for label in item.cleared if label != item.label]
        where = f"{memory}; also in {', '.join(also)}" if also else memory
        if item.freed:
            lines.append(f"released `{item.label}` ({where}) before this cell loads a new one — {GUARD_OFF}")
        else:
            lines.append(
                f"⚠ could not free `{item.label}` ({where}): still held by {'; '.join(item.held_by)} — "
                f"the new model will load next to it; {GUARD_OFF}"
            )
    return lines
