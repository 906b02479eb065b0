"""The `%gpustate` snapshot: memory per device, who holds it, and what does not add up.

Pure logic: it takes the user's visible roots and the hidden references (release.HiddenRef) as
arguments. It never initialises CUDA and never allocates on a device (measure/memory.py reads only
what is already measured).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from llm_magic.engine.holders import (
    HIDDEN,
    NAMED,
    UNNAMED,
    HolderRow,
    HolderScan,
    scan_holders,
)
from llm_magic.engine.release import HiddenRef
from llm_magic.engine.walk import ROOT_BUDGET, SEARCH_EVERYTHING, cut_names, paused_gc
from llm_magic.measure.memory import MemorySnapshot, memory_snapshot
from llm_magic.measure.placement import DiskSource, model_placement
from llm_magic.units import format_bytes

DEFAULT_SMALL_BYTES = 1 << 20  # holders below this are hidden unless --all
# CUDA allocations that no Python holder explains, above which unnamed holders are searched
# for automatically (the gc scan is the costly part of a snapshot).
ORPHAN_TRIGGER_BYTES = 1 << 20


@dataclass(frozen=True)
class Reconciliation:
    """Bytes the holders explain on a device, against what the device reports."""

    device: str
    explained_bytes: int
    reported_bytes: int | None  # cuda: memory_allocated; cpu: this process's RSS
    reported_by: str

    @property
    def unexplained_bytes(self) -> int | None:
        return None if self.reported_bytes is None else self.reported_bytes - self.explained_bytes

    def to_dict(self) -> dict:
        return {
            "device": self.device,
            "explained_bytes": self.explained_bytes,
            "reported_bytes": self.reported_bytes,
            "reported_by": self.reported_by,
            "unexplained_bytes": self.unexplained_bytes,
        }


@dataclass(frozen=True)
class GpuState:
    memory: MemorySnapshot
    holders: HolderScan
    disk: tuple[DiskSource, ...]
    reconciliation: tuple[Reconciliation, ...]
    flags: tuple[str, ...]
    small_bytes: int  # holders below this are left out of the table unless asked

    def shown_holders(self) -> tuple[HolderRow, ...]:
        """Biggest first; those below `small_bytes` are left out of the table (not the data)."""
        rows = sorted(self.holders.rows, key=lambda row: (-row.total, row.path))
        return tuple(row for row in rows if row.total >= self.small_bytes)

    def to_dict(self) -> dict:
        return {
            "memory": self.memory.to_dict(),
            "holders": self.holders.to_dict(),
            "disk": [source.to_dict() for source in self.disk],
            "reconciliation": [line.to_dict() for line in self.reconciliation],
            "flags": list(self.flags),
            "small_bytes": self.small_bytes,
        }

    def _repr_mimebundle_(self, include=None, exclude=None) -> dict:
        from llm_magic.render.core import mimebundle
        from llm_magic.render.gpustate import render_gpustate

        return mimebundle(render_gpustate(self), include=include, exclude=exclude)


def _reconcile(memory: MemorySnapshot, explained: dict[str, int]) -> tuple[Reconciliation, ...]:
    lines = []
    for device in memory.devices:
        if device.device == "cpu":
            lines.append(Reconciliation("cpu", explained.get("cpu", 0), device.rss_bytes, "RSS (the whole process)"))
        else:
            lines.append(Reconciliation(device.device, explained.get(device.device, 0), device.allocated_bytes, "memory_allocated"))
    return tuple(lines)


def _cuda_unexplained(lines: Iterable[Reconciliation]) -> int:
    return sum(max(line.unexplained_bytes or 0, 0) for line in lines if line.device.startswith("cuda"))


def _disk_sources(models: Sequence[tuple[str, Any]]) -> tuple[DiskSource, ...]:
    """Files that loaded models read offloaded weights from, each once."""
    sources: dict[str, DiskSource] = {}
    for path, model in models:
        try:
            placement = model_placement(model, path)
        except Exception:
            continue
        for source in placement.disk_sources:
            sources.setdefault(source.path, source)
    return tuple(sources.values())


def _flags(scan: HolderScan, disk: Sequence[DiskSource], small_bytes: int) -> tuple[str, ...]:
    flags = []
    named = {row.path for row in scan.rows if row.kind == NAMED}
    for row in scan.rows:
        if row.kind == NAMED or row.total < small_bytes:
            continue
        for device, count in sorted(row.stale_bytes(named).items()):
            flags.append(f"{format_bytes(count)} on {device} held {_who_and_fix(row, scan.cut)}")
    if disk:
        flags.append(
            f"{len(disk)} disk location(s) serve offloaded weights ({format_bytes(sum(s.nbytes or 0 for s in disk))}): "
            "generation reads them at every step — free memory and reload with %%llmload"
        )
    return tuple(flags)


def _who_and_fix(row: HolderRow, cut: Sequence[str]) -> str:
    """Who holds a stale copy, and a fix that does something (`%llmfree --hidden` frees only
    hidden copies: for an unnamed holder it would release nothing)."""
    if row.kind == HIDDEN:
        return f"only by {row.path} — `%llmfree --hidden`"
    if cut:
        return f"by an {row.path}: perhaps inside {cut_names(cut)}, where the search stopped early — {SEARCH_EVERYTHING}"
    return f"by an {row.path} (no name reaches it) — find what refers to it with gc.get_referrers"


def take_snapshot(
    visible: Iterable[tuple[str, Any]],
    hidden: Sequence[HiddenRef],
    *,
    deep: bool = False,
    small_bytes: int = DEFAULT_SMALL_BYTES,
) -> GpuState:
    """Measure memory, find every holder, reconcile the two, and flag what looks wrong.

    Unnamed holders (found through gc) are searched with `deep`, or automatically when CUDA
    reports allocations that no named or hidden holder explains. `deep` also walks every name
    to its end (by default, each name's walk has a budget, and the cut names are reported).
    """
    with paused_gc():
        visible = list(visible)
        memory = memory_snapshot()
        models: list[tuple[str, Any]] = []
        budget = None if deep else ROOT_BUDGET  # --deep: every name walked to the end
        scan = scan_holders(visible, hidden, find_orphans=deep, named_models=models, budget=budget)
        lines = _reconcile(memory, scan.explained_by_device)
        if not deep and _cuda_unexplained(lines) > ORPHAN_TRIGGER_BYTES:
            scan = scan_holders(visible, hidden, find_orphans=True)
            lines = _reconcile(memory, scan.explained_by_device)
        disk = _disk_sources(models)
        return GpuState(memory, scan, disk, lines, _flags(scan, disk, small_bytes), small_bytes)


__all__ = ["GpuState", "Reconciliation", "take_snapshot", "NAMED", "HIDDEN", "UNNAMED"]
