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
from llm_magic.engine.tensors import (
    Footprint,
    find_tensor_holders,
    is_module,
    loaded_torch,
    tensor_storage,
    tensors_of,
)
from llm_magic.engine.walk import WalkStats, type_name

NAMED, HIDDEN, UNNAMED = "named", "hidden", "unnamed"


@dataclass(frozen=True)
class HolderRow:
    path: str  # as the user would write it: "model", "Out[7]", "last traceback, frame ..."
    kind: str  # NAMED, HIDDEN or UNNAMED
    type_name: str
    bytes_by_device: dict[str, int]  # each storage once within this holder
    shared_by_device: dict[str, int] = field(default_factory=dict)  # of which also held by others
    shared_with: tuple[str, ...] = ()
    also_held_by: tuple[str, ...] = ()  # hidden references to this very object (`Out[3]`, `_`)

    @property
    def total(self) -> int:
        return sum(self.bytes_by_device.values())

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "kind": self.kind,
            "type": self.type_name,
            "bytes_by_device": dict(self.bytes_by_device),
            "shared_by_device": dict(self.shared_by_device),
            "shared_with": list(self.shared_with),
            "also_held_by": list(self.also_held_by),
        }


@dataclass(frozen=True)
class HolderScan:
    rows: tuple[HolderRow, ...]
    explained_by_device: dict[str, int]  # union of all holders' storages
    orphans_searched: bool
    truncated: bool  # the walk's budget ran out: some holders may be missing

    def to_dict(self) -> dict:
        return {
            "rows": [row.to_dict() for row in self.rows],
            "explained_by_device": dict(self.explained_by_device),
            "orphans_searched": self.orphans_searched,
            "truncated": self.truncated,
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
    roots: Iterable[tuple[str, Any]], kind: str, stats: WalkStats
) -> list[tuple[str, str, Any, Footprint]]:
    """One row per model (at its own path) and per root for loose tensors.

    An optimizer's hundreds of parameters are one row `opt`, not hundreds; `results[0].model`
    is its own row because a model is what the user thinks of as one thing.
    """
    groups: dict[str, tuple[str, str, Any, Footprint]] = {}
    for label, root in roots:
        for path, leaf in find_tensor_holders([(label, root)], stats=stats):
            key = path if is_module(leaf) else label
            if key not in groups:
                groups[key] = (key, kind, leaf if is_module(leaf) else root, Footprint())
            groups[key][3].add(leaf)
    return list(groups.values())


def scan_holders(
    visible: Iterable[tuple[str, Any]],
    hidden: Sequence[HiddenRef],
    *,
    find_orphans: bool = False,
    named_models: list | None = None,
) -> HolderScan:
    """Every tensor holder, named the way the user would write it, with shared storages.

    `named_models`, if given, receives (path, module) for each model a name reaches: callers
    that need the objects (disk sources) get them without a second walk; the scan stays data.
    """
    stats = WalkStats()
    found = _group_by_holder(visible, NAMED, stats)
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
        found += _group_by_holder(roots, HIDDEN, stats)

    known = set().union(*(footprint.storage_keys for *_, footprint in found)) if found else set()
    if find_orphans:
        found += [(path, UNNAMED, leaf, Footprint().add(leaf)) for path, leaf in _unnamed(known, stats.seen)]
    footprints = [footprint for *_, footprint in found]

    owners: dict[tuple, list[int]] = defaultdict(list)
    for index, footprint in enumerate(footprints):
        for key in footprint.storage_keys:
            owners[key].append(index)
    explained = Footprint()
    for footprint in footprints:
        explained.merge(footprint)

    rows = []
    for index, (path, kind, holder, footprint) in enumerate(found):
        shared_keys = [key for key in footprint.storage_keys if len(owners[key]) > 1]
        partners = dict.fromkeys(i for key in shared_keys for i in owners[key] if i != index)
        shared = footprint.restricted_to(shared_keys)
        rows.append(
            HolderRow(
                path=path,
                kind=kind,
                type_name=type_name(holder),
                bytes_by_device=footprint.by_device(),
                shared_by_device=shared.by_device(),
                shared_with=tuple(found[i][0] for i in partners),
                also_held_by=tuple(also_held.get(index, ())),
            )
        )
    return HolderScan(tuple(rows), explained.by_device(), find_orphans, stats.truncated)
