"""Who holds tensor memory: named, hidden and unnamed holders, each storage counted once.

Pure logic over plain roots: `(path, object)` pairs for what the user can see, and
release.HiddenRef objects for output history and tracebacks. No IPython here.
"""

from __future__ import annotations

import gc
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from llm_magic.engine.release import HiddenRef
from llm_magic.engine.shapes import type_name
from llm_magic.engine.tensors import (
    Footprint,
    is_module,
    is_tensor_holder_leaf,
    loaded_torch,
    tensor_storage,
    tensors_of,
)
from llm_magic.engine.walk import (
    ROOT_BUDGET,
    TOTAL_BUDGET,
    WalkStats,
    paused_gc,
    walk_leaves,
)

NAMED, HIDDEN, UNNAMED = "named", "hidden", "unnamed"


@dataclass(frozen=True)
class HolderRow:
    """One object that holds tensor memory: a model at its own path, or a root's loose tensors.

    The one holder record: `%gpustate`'s table, `%%llmload`'s "Still loaded" list and the OOM
    rescue all show these.
    """

    path: str  # as the user would write it: "model", "Out[7]", "last traceback, frame ..."
    kind: str  # NAMED, HIDDEN or UNNAMED
    type_name: str
    bytes_by_device: dict[str, int]  # each storage once within this holder
    shared_by_device: dict[str, int] = field(default_factory=dict)  # of which also held by others
    shared_with: tuple[str, ...] = ()
    also_held_by: tuple[str, ...] = ()  # hidden references to this very object (`Out[3]`, `_`)
    is_model: bool = False  # a torch module (a model, or a layer the user named)

    @property
    def total(self) -> int:
        return sum(self.bytes_by_device.values())

    def stale_bytes(self, named_paths: set[str]) -> dict[str, int]:
        """Bytes per device that releasing this (hidden or unnamed) holder would free: all of
        its own, less what it shares with a named holder (that stays alive with the name)."""
        shares_named = any(partner in named_paths for partner in self.shared_with)
        stale = {device: nbytes - (self.shared_by_device.get(device, 0) if shares_named else 0)
                 for device, nbytes in self.bytes_by_device.items()}
        return {device: nbytes for device, nbytes in stale.items() if nbytes > 0}

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "kind": self.kind,
            "type": self.type_name,
            "bytes_by_device": dict(self.bytes_by_device),
            "shared_by_device": dict(self.shared_by_device),
            "shared_with": list(self.shared_with),
            "also_held_by": list(self.also_held_by),
            "is_model": self.is_model,
        }


@dataclass(frozen=True)
class HolderScan:
    rows: tuple[HolderRow, ...]
    explained_by_device: dict[str, int]  # union of all holders' storages
    orphans_searched: bool
    cut: tuple[str, ...] = ()  # the roots whose walk was cut ("big_list", "Out[3]"): holders inside may be missing

    @property
    def truncated(self) -> bool:
        return bool(self.cut)

    def to_dict(self) -> dict:
        return {
            "rows": [row.to_dict() for row in self.rows],
            "explained_by_device": dict(self.explained_by_device),
            "orphans_searched": self.orphans_searched,
            "truncated": self.truncated,
            "cut": list(self.cut),
        }


def _unnamed(known_storages: set[tuple], seen: set[int]) -> list[tuple[str, Any]]:
    """Tensors and modules alive but reachable from no root, whose memory nobody explains.

    A scan of every gc-tracked object: the costly part of a snapshot, hence optional.
    """
    torch = loaded_torch()
    if torch is None:
        return []
    tensor_type, module_type = torch.Tensor, torch.nn.Module
    gc.collect()  # unreachable cycles are garbage about to go, not holders
    candidates = [obj for obj in gc.get_objects() if issubclass(type(obj), (tensor_type, module_type)) and id(obj) not in seen]
    found: list[tuple[str, Any]] = []
    covered = set(known_storages)
    # Modules first, so a stale model shows as one row, not as each of its weights.
    candidates.sort(key=lambda obj: not issubclass(type(obj), module_type))
    for obj in candidates:
        # tensor_storage reads with torch functions disabled: a subclass's __torch_function__
        # must not run (or raise) inside a scan.
        keys = {storage.key for storage in map(tensor_storage, tensors_of(obj)) if storage.device != "meta"}
        new = keys - covered
        if not new:
            continue
        covered |= keys  # a stale model's own weights will not show again as separate rows
        found.append((f"unnamed {type_name(obj)} at {id(obj):#x}", obj))
    return found


def _group_by_holder(
    roots: Iterable[tuple[str, Any]], kind: str, stats: WalkStats, budget: int | None
) -> list[tuple[str, str, Any, Footprint]]:
    """One row per model (at its own path) and per root for loose tensors.

    An optimizer's hundreds of parameters are one row `opt`, not hundreds; `results[0].model`
    is its own row because a model is what the user thinks of as one thing; a `generate`
    output's many small cache tensors are one row by their total. All roots are walked at once,
    shortest paths first, each with its own budget.
    """
    roots = list(roots)
    values = dict(roots)
    groups: dict[str, tuple[str, str, Any, Footprint]] = {}
    total = TOTAL_BUDGET if budget is not None else None
    for label, path, leaf in walk_leaves(roots, is_leaf=is_tensor_holder_leaf, budget=budget, total=total, stats=stats):
        model = is_module(leaf)
        key = path if model else label
        if key not in groups:
            groups[key] = (key, kind, leaf if model else values.get(label), Footprint())
        groups[key][3].add(leaf)
    return list(groups.values())


def scan_holders(
    visible: Iterable[tuple[str, Any]],
    hidden: Sequence[HiddenRef],
    *,
    find_orphans: bool = False,
    named_models: list | None = None,
    budget: int | None = ROOT_BUDGET,
    exclude: Sequence[Any] = (),
) -> HolderScan:
    """Every tensor holder, named the way the user would write it, with shared storages.

    `named_models`, if given, receives (path, module) for each model a name reaches: callers
    that need the objects (disk sources) get them without a second walk; the scan stays data.
    `budget` is per root (None: walk everything). `exclude`: objects that are not holders here
    (a model just loaded): not walked, and their storages counted in no row.
    """
    with paused_gc():
        return _scan(visible, hidden, find_orphans, named_models, budget, exclude)


def _scan(visible, hidden, find_orphans, named_models, budget, exclude) -> HolderScan:
    stats = WalkStats()
    stats.seen.update(id(obj) for obj in exclude)
    found = _group_by_holder(visible, NAMED, stats, budget)
    if named_models is not None:
        named_models.extend((path, holder) for path, _, holder, _ in found if is_module(holder))
    named = {id(holder): index for index, (_, _, holder, _) in enumerate(found)}
    also_held: dict[int, list[str]] = defaultdict(list)
    for ref in hidden:
        try:
            roots = list(ref.roots())
        except Exception:
            continue
        # A hidden copy of a named model frees nothing today, but will keep it alive once the
        # name is rebound: say so on the named row.
        for label, obj in roots:
            if id(obj) in named and label not in also_held[named[id(obj)]]:
                also_held[named[id(obj)]].append(label)
        found += _group_by_holder(roots, HIDDEN, stats, budget)

    if exclude:
        excluded = Footprint().add_all(exclude).storage_keys
        found = [(path, kind, holder, footprint.restricted_to(footprint.storage_keys - excluded)) for path, kind, holder, footprint in found]
    known = set().union(*(footprint.storage_keys for *_, footprint in found)) if found else set()
    if find_orphans:
        found += [(path, UNNAMED, leaf, Footprint().add(leaf)) for path, leaf in _unnamed(known, stats.seen)]
    rows = _rows(found, also_held)
    explained = Footprint()
    for *_, footprint in found:
        explained.merge(footprint)
    return HolderScan(rows, explained.by_device(), find_orphans, tuple(stats.cut))


def _rows(found: list[tuple[str, str, Any, Footprint]], also_held: dict[int, list[str]]) -> tuple[HolderRow, ...]:
    """The rows, each saying which of its storages other rows share, and with whom."""
    owners: dict[tuple, list[int]] = defaultdict(list)
    for index, (*_, footprint) in enumerate(found):
        for key in footprint.storage_keys:
            owners[key].append(index)
    rows = []
    for index, (path, kind, holder, footprint) in enumerate(found):
        shared_keys = [key for key in footprint.storage_keys if len(owners[key]) > 1]
        partners = dict.fromkeys(i for key in shared_keys for i in owners[key] if i != index)
        rows.append(
            HolderRow(
                path=path,
                kind=kind,
                type_name=type_name(holder),
                bytes_by_device=footprint.by_device(),
                shared_by_device=footprint.restricted_to(shared_keys).by_device(),
                shared_with=tuple(found[i][0] for i in partners),
                also_held_by=tuple(also_held.get(index, ())),
                is_model=is_module(holder),
            )
        )
    return tuple(rows)
