"""What `%llmfree` releases: named objects, every tensor holder, or only the hidden copies.

The same engine as `%%llmload` (release.py) does the work; this module only chooses targets.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Iterator

from llm_magic.engine.paths import (
    TargetPath,
    Unresolvable,
    parse_target,
    resolve,
    unbinder,
)
from llm_magic.engine.release import Binding, HiddenRef, ReleaseResult, Target, release
from llm_magic.engine.tensors import find_tensor_holders, holds_tensors
from llm_magic.engine.walk import WalkStats, paused_gc
from llm_magic.ipython import shell_state


class FreeError(ValueError):
    """Bad names: nothing was released."""


def hidden_only_holders(shell, hidden: list[HiddenRef], stats: WalkStats | None = None) -> Iterator[tuple[str, Any]]:
    """(label, tensor-or-module) reachable through hidden references but from no user name."""
    stats = stats if stats is not None else WalkStats()
    for _ in find_tensor_holders(shell_state.visible_names(shell), stats=stats):
        pass  # marks everything the user can reach as seen
    for ref in hidden:
        try:
            roots = list(ref.roots())
        except Exception:
            continue
        yield from find_tensor_holders(roots, stats=stats)


def _holding_tensors(hidden: list[HiddenRef]) -> list[HiddenRef]:
    holding = []
    for ref in hidden:
        try:
            if any(holds_tensors(value) for _, value in ref.roots()):
                holding.append(ref)
        except Exception:
            continue
    return holding


def _named_targets(shell, names: list[str]) -> list[Target]:
    paths = []
    for name in names:
        try:
            path = parse_target(name)
            resolve(path, shell.user_ns)
        except ValueError as error:
            raise FreeError(str(error)) from None
        except Unresolvable as missing:
            raise FreeError(f"{missing.reason}: nothing was released") from None
        paths.append(path)
    # Resolved again only once every name is known to exist: all or nothing.
    return [
        Target(path.text, resolve(path, shell.user_ns), (Binding(path.text, unbinder(path, shell.user_ns)),))
        for path in paths
    ]


def run_llmfree(shell, names: list[str], *, everything: bool = False, hidden_only: bool = False, dry_run: bool = False) -> ReleaseResult:
    shell_state.require_shell(shell)
    if not names and not everything and not hidden_only:
        raise FreeError("%llmfree needs NAME ..., --all or --hidden")
    with paused_gc():
        return _free(shell, names, everything, hidden_only, dry_run)


def _free(shell, names: list[str], everything: bool, hidden_only: bool, dry_run: bool) -> ReleaseResult:
    targets = _named_targets(shell, names)
    hidden = shell_state.hidden_refs(shell)
    also_clear: list[HiddenRef] = []
    claimed = {id(target.value) for target in targets}
    cut: list[str] = []  # names searched only in part: what they hold is not released
    if everything:
        for name, value in shell_state.visible_names(shell):
            if id(value) in claimed:
                continue
            stats = WalkStats()
            if holds_tensors(value, stats=stats):
                claimed.add(id(value))
                targets.append(Target(name, value, (Binding(name, unbinder(TargetPath(name), shell.user_ns)),)))
            elif stats.truncated:
                cut.append(name)
    if everything or hidden_only:
        stats = WalkStats()
        for label, leaf in hidden_only_holders(shell, hidden, stats):
            if id(leaf) not in claimed:
                claimed.add(id(leaf))
                targets.append(Target(label, leaf, ()))
        # Hidden places searched in part (a huge `Out[3]`); the names' own cuts are above.
        visible = {name for name, _ in shell_state.visible_names(shell)}
        cut += [label for label in stats.cut if label not in visible]
        also_clear = _holding_tensors(hidden)
    value = leaf = None  # noqa: F841 - no strong reference may outlive the release
    result = release(targets, hidden, lambda: shell_state.naming_roots(shell), also_clear=also_clear, dry_run=dry_run)
    return replace(result, cut=tuple(cut)) if cut else result
