"""Guard mode: a plain `model = X.from_pretrained(...)` cell, re-run, first releases the old model.

Before the cell runs, for each target the cell assigns a model load to (cell/loads.py), the old
value and every hidden copy of it (Out, `_`, the last traceback) are released by the same engine
and the same rules as `%%llmload`:
- a target the cell reads before rebinding (`model = get_peft_model(model, cfg)`) is kept;
- a load whose source cannot resolve (a typo in a path, a model not in the offline cache)
  blocks the whole release: the cell then fails on its own, with the old model still there;
- a line magic whose effect cannot be read, or a cell that does not parse, means guard does
  nothing at all;
- anything that could not be freed is named.
After the cell, each model it bound gets its placement line.

The functions return plain events; ipython/hooks.py calls them and render/watch.py
writes the lines.
"""

from __future__ import annotations

from dataclasses import dataclass

from llm_magic.cell.loads import load_sites, may_load
from llm_magic.engine.paths import TargetPath
from llm_magic.engine.release import ReleaseResult, release


@dataclass(frozen=True)
class GuardPlan:
    """What guard read in a cell that loads models: the targets it will bind."""

    targets: tuple[TargetPath, ...]


@dataclass(frozen=True)
class GuardRelease:
    """Before a cell: what guard released (or why it released nothing)."""

    released: ReleaseResult | None  # None: nothing was released
    kept_for_reads: tuple[str, ...] = ()  # targets the cell reads before rebinding
    blocked: tuple[str, ...] = ()  # one line per load that cannot start: nothing was released


def is_left_to_llmload(raw_cell: str) -> bool:
    """`%%llmload` cells (and `%llmload` lines) do their own release."""
    return any(line.lstrip().startswith(("%%llmload", "%llmload")) for line in raw_cell.splitlines())


def guard_before_cell(shell, raw_cell: str) -> tuple[GuardPlan | None, GuardRelease | None]:
    """Release what a model-loading cell replaces. (None, None) for every other cell."""
    if not may_load(raw_cell) or is_left_to_llmload(raw_cell):
        return None, None  # the common cell: a regular expression, nothing more
    from llm_magic.cell.body import CellSyntaxError
    from llm_magic.cell.magics import UnreadableMagic
    from llm_magic.commands.cell_plan import read_cell, release_targets
    from llm_magic.ipython import shell_state

    try:
        plan = read_cell(shell.transform_cell(raw_cell), shell.user_ns)
    except (CellSyntaxError, UnreadableMagic, SyntaxError):
        return None, None  # the cell fails or does something we cannot read: leave it be
    targets = tuple(site.target for site in load_sites(plan.analysed))
    if not targets:
        return None, None
    kept = tuple(path for path in targets if path in plan.read_first)
    blocked = _unresolvable_sources(plan)
    if blocked:
        return GuardPlan(targets), GuardRelease(None, (), blocked)
    kept_labels = tuple(target.label for target in release_targets(shell.user_ns, list(kept)))  # those holding tensors
    releasable = release_targets(shell.user_ns, [path for path in targets if path not in kept])
    if not releasable:
        return GuardPlan(targets), (GuardRelease(None, kept_labels) if kept_labels else None)
    released = release(releasable, shell_state.hidden_refs(shell), lambda: shell_state.naming_roots(shell))
    return GuardPlan(targets), GuardRelease(released, kept_labels)


def _unresolvable_sources(plan) -> tuple[str, ...]:
    """One line per load whose checkpoint cannot be found (the load would fail before reading
    weights): releasing first would lose the old model for nothing."""
    from llm_magic.predict.sources import check_load_sources

    return tuple(problem.reason for problem in check_load_sources(plan.load_calls))


def guard_after_cell(shell, plan: GuardPlan) -> list:
    """measure.placement.ModelPlacement of each model the cell bound to a load target."""
    from llm_magic.commands.cell_plan import bound_models
    from llm_magic.engine.tensors import loaded_torch
    from llm_magic.measure.placement import model_placement

    if loaded_torch() is None:
        return []
    return [model_placement(model, label) for label, model in bound_models(shell.user_ns, plan.targets)]
