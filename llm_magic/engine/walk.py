"""Walking the user's object graph safely, with paths a user could type.

One breadth-first walk from named roots (`model`, `results`, `Out[3]`), shortest path first,
each object visited once. What an object holds is contents.py; where the walk stops, shapes.py.

Each root has its own budget of items read, so one huge container (a tokenized dataset of a
million items) cannot hide what the names after it hold: its walk is cut, the cut is recorded
by name (`WalkStats.cut`), and every other name is walked as if it were not there. A total
budget bounds the whole walk on a namespace of thousands of big containers.

Automatic garbage collection is the hidden cost of a walk in a big heap: the walk allocates
paths and queue entries, each allocation counts towards gc's thresholds, and a full collection
scans every object of the process. Callers pause it (`paused_gc`) around their walks.
"""

from __future__ import annotations

import gc
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from llm_magic.engine.contents import expand
from llm_magic.engine.shapes import (
    ATOM,
    ATOMIC_TYPES,
    OPAQUE,
    layout,
)

# Items read per root (every reference looked at, atomic values included). A namespace of
# ordinary objects is read in full; a million-item list is cut after this many.
ROOT_BUDGET = 20_000
# Items read by one walk over all its roots: about a second on a slow CPU.
TOTAL_BUDGET = 1_000_000


@contextmanager
def paused_gc() -> Iterator[None]:
    """Automatic gc off for the block, back on after it (Ctrl-C included), if it was on.

    Nested blocks and a user who turned gc off are both respected: only the block that turned
    it off turns it back on.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@dataclass
class WalkStats:
    read: int = 0  # references read (the budget's unit)
    seen: set[int] = field(default_factory=set)
    cut: list[str] = field(default_factory=list)  # roots whose walk stopped at a budget

    @property
    def truncated(self) -> bool:
        """Did some budget run out before the graph did?"""
        return bool(self.cut)

    def note_cut(self, label: str) -> None:
        if label not in self.cut:
            self.cut.append(label)


def _walk(
    roots: Iterable[tuple[str, Any]],
    *,
    leaf: Callable[[Any], bool],
    budget: int | None,
    total: int | None,
    stats: WalkStats,
    wanted: set[int] | None = None,
    found: dict[int, list[str]] | None = None,
) -> Iterator[tuple[str, str, Any]]:
    """Yield (root label, path, object) for every leaf, shortest path first.

    A leaf is yielded once and not walked into. `leaf` is asked once per type (its answer
    must depend on the type only). With `wanted`, every path that reaches a wanted object is
    recorded in `found`, also through objects already seen by another route.
    """
    # One function on purpose: this is the hot loop of every scan (a million objects in a busy
    # notebook); helpers called per object would cost a third of its time.
    labels: list[str] = []
    queue: deque[tuple[int, str, Any]] = deque()
    seen = stats.seen  # an object is seen once queued: each is visited once, by its first path
    for label, obj in roots:
        if wanted is not None and id(obj) in wanted:
            found.setdefault(id(obj), []).append(label)
        labels.append(label)
        if type(obj) not in ATOMIC_TYPES and id(obj) not in seen:
            seen.add(id(obj))
            queue.append((len(labels) - 1, label, obj))
    spent = [0] * len(labels)
    cut = [False] * len(labels)
    verdicts: dict[int, tuple[bool, Any, bool]] = {}  # per type id: (leaf, layout, walkable)
    while queue:
        root, path, obj = queue.popleft()
        kind = type(obj)
        verdict = verdicts.get(id(kind))
        if verdict is None:
            found_layout = layout(kind)
            verdict = verdicts[id(kind)] = (bool(leaf(obj)), found_layout, found_layout.shape not in (ATOM, OPAQUE))
        is_leaf, shape, walkable = verdict
        if is_leaf:
            yield labels[root], path, obj
            continue
        if not walkable:
            continue
        room = None if budget is None else budget - spent[root]
        if total is not None and (room is None or total - stats.read < room):
            room = total - stats.read
        if room is not None and room <= 0:
            if not cut[root]:
                cut[root] = True
                stats.note_cut(labels[root])
            continue
        items, read, complete = expand(obj, shape, room)
        spent[root] += read
        stats.read += read
        if not complete and not cut[root]:
            cut[root] = True
            stats.note_cut(labels[root])
        for step, child in items:
            child_key = id(child)
            if wanted is not None and child_key in wanted:
                found.setdefault(child_key, []).append(path + step)
            if child_key not in seen:
                seen.add(child_key)
                queue.append((root, path + step, child))


def cut_names(cut: Iterable[str], limit: int = 3) -> str:
    """The roots whose walk was cut, as every message names them: "a, b, c and 2 more"."""
    cut = list(cut)
    return ", ".join(cut[:limit]) + (f" and {len(cut) - limit} more" if len(cut) > limit else "")


# What every "the walk was cut" message ends with: how to see everything.
SEARCH_EVERYTHING = "`%gpustate --deep` searches everything"


def walk_leaves(
    roots: Iterable[tuple[str, Any]],
    *,
    is_leaf: Callable[[Any], bool],
    budget: int | None = ROOT_BUDGET,
    total: int | None = TOTAL_BUDGET,
    stats: WalkStats | None = None,
) -> Iterator[tuple[str, str, Any]]:
    """(root label, path, leaf) for every leaf reachable from `roots`, shortest path first.

    A leaf (a tensor, a module: whatever `is_leaf` says of the type) is yielded once and not
    walked into. `budget` is per root (None: unbounded, as `%gpustate --deep` walks). Pass the
    same `stats` to a second call to go on with the objects already seen excluded: that is how
    hidden holders are told from visible ones.
    """
    stats = stats if stats is not None else WalkStats()
    return _walk(roots, leaf=is_leaf, budget=budget, total=total, stats=stats)


def find_paths(
    roots: Iterable[tuple[str, Any]],
    wanted: set[int],
    *,
    stop: Callable[[Any], bool] = lambda _: False,
    budget: int | None = ROOT_BUDGET,
    total: int | None = TOTAL_BUDGET,
    stats: WalkStats | None = None,
) -> dict[int, list[str]]:
    """Every path (from any root) that reaches an object whose id is in `wanted`.

    Unlike `walk_leaves`, an object reached again by another route is recorded again, so a
    model held both by `model` and `results[0].model` is named by both. Objects for which
    `stop` is true (a question about the type) are not walked into: tensors hold nothing of
    interest.
    """
    stats = stats if stats is not None else WalkStats()
    found: dict[int, list[str]] = {}
    for _ in _walk(roots, leaf=stop, budget=budget, total=total, stats=stats, wanted=wanted, found=found):
        pass
    return found
