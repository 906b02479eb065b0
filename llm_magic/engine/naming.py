"""Who still holds an object that survived a release: paths from the user's names, or, when no
name reaches it, the types of what refers to it (one heap scan for all survivors)."""

from __future__ import annotations

import gc
import re
import types
from typing import Any, Iterable, Sequence

from llm_magic.engine.shapes import type_name
from llm_magic.engine.tensors import is_module, is_tensor, module_tensors
from llm_magic.engine.walk import (
    SEARCH_EVERYTHING,
    WalkStats,
    cut_names,
    find_paths,
    paused_gc,
)

_INDEX = re.compile(r"\[\d+\]")


def name_holders(
    survivors: Sequence[Any],
    naming_roots: Iterable[tuple[str, Any]],
    *,
    ignore: Iterable[Any] = (),
) -> dict[int, list[str]]:
    """Paths from the user's names (then hidden places) that still reach each survivor.

    Survivors no name reaches are described by the types of their referrers, from one gc scan
    for all of them; `ignore` are the caller's own containers of survivors (not holders). When
    the walk was cut (a name holding too many objects), "no name reaches it" may be false:
    the description says where the walk stopped instead.
    """
    wanted = {id(obj) for obj in survivors}
    stats = WalkStats()
    with paused_gc():
        found = find_paths(naming_roots, wanted, stop=is_tensor, stats=stats)
    unnamed = [obj for obj in survivors if id(obj) not in found]
    # The weights of an unnamed model are held by that model: it alone is described.
    inside = {id(tensor) for obj in unnamed if is_module(obj) for _, tensor in module_tensors(obj)}
    unnamed = [obj for obj in unnamed if id(obj) not in inside]
    if unnamed:
        ours = {id(survivors), id(unnamed), *(id(container) for container in ignore)}
        for key, referrers in _referrer_types(unnamed, ours).items():
            found[key] = [_describe_unnamed(referrers, stats.cut)]
    return found


def _describe_unnamed(referrers: str, cut: list[str]) -> str:
    if not cut:
        return f"unnamed: reachable from no name, referenced by {referrers}"
    return (
        f"not found: the search stopped early in {cut_names(cut)} (too many objects), referenced by {referrers}"
        f" — {SEARCH_EVERYTHING}"
    )


def _referrer_types(objs: list[Any], ours: set[int]) -> dict[int, str]:
    """The types that refer to each object (at most four), from one heap scan for all."""
    ids = {id(obj) for obj in objs}
    kinds: dict[int, set[str]] = {key: set() for key in ids}
    for referrer in gc.get_referrers(*objs):
        if id(referrer) in ours or type(referrer) is types.FrameType:
            continue  # our own bookkeeping, and the frames of this very call
        for child in gc.get_referents(referrer):
            if id(child) in ids:
                kinds[id(child)].add(type_name(referrer, qualified=True))
    return {key: ", ".join(sorted(names)[:4]) or "a C extension or a frame" for key, names in kinds.items()}


def summarise(paths: Iterable[str], shown: int = 5) -> tuple[str, ...]:
    """A few holder paths, then a count: a kept optimizer names hundreds of parameters.

    A path inside one already listed (`results[0].model._modules[...]` under
    `results[0].model`) adds nothing and is left out; paths that differ only in their indices
    (`opt.param_groups[0]['params'][0]`, `[1]`, ...) show once, so that each holder gets a line
    (`trainer.model`, `trainer.optimizer...`) before the count.
    """
    outer: list[str] = []
    for path in paths:
        if not any(path.startswith(prefix) and path[len(prefix):][:1] in (".", "[") for prefix in outer):
            outer.append(path)
    first_of_family: dict[str, str] = {}
    for path in outer:
        first_of_family.setdefault(_INDEX.sub("[*]", path), path)
    listed = list(first_of_family.values())
    if len(listed) > shown + 1:
        listed = listed[:shown]
    more = len(outer) - len(listed)
    return tuple(listed) + ((f"... and {more} more",) if more else ())
