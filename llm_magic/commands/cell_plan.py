"""Reading a cell before it runs: what it will replace, what it still needs, what it loads.

One reading serves every command that releases on the user's behalf (`%%llmload`, guard mode):
- the code IPython will run (`shell.transform_cell`), parsed: a syntax error stops everything
  before anything changes;
- line magics read as the statements they run (`%time model = ...` assigns `model`); a magic
  whose effect cannot be read stops everything;
- the targets the cell assigns (`model`, `tok, model`, `box.model`, `d["k"]`);
- which of them the cell reads before rebinding (`model = get_peft_model(model, cfg)`): those
  are kept, never released;
- the model loads it makes (`X.from_pretrained(...)`), for the pre-flight and the source check.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import Any, Mapping

from llm_magic.cell.body import assignment_targets, last_expression, parse_body
from llm_magic.cell.magics import expand_line_magics
from llm_magic.cell.reads import Reads, analyse_reads
from llm_magic.engine.paths import TargetPath, Unresolvable, resolve, unbinder
from llm_magic.engine.release import Binding, Target
from llm_magic.engine.tensors import holds_tensors


@dataclass(frozen=True)
class CellPlan:
    source: str  # what IPython would run (magics transformed), compiled as the body
    tree: ast.Module  # `source` parsed
    analysed: ast.Module  # `tree` with line magics replaced by what they run (for reading only)
    targets: tuple[TargetPath, ...]  # what the cell assigns, line magics included
    read_first: tuple[TargetPath, ...]  # targets the cell reads before rebinding: kept
    load_calls: tuple  # predict.calls.LoadCall for each `X.from_pretrained(...)` (models, tokenizers, ...)
    reads: Reads  # every load of the body, to ask about names other than the targets

    @property
    def replaced(self) -> tuple[TargetPath, ...]:
        """The targets whose current values the cell replaces without reading them."""
        return tuple(path for path in self.targets if path not in self.read_first)


def read_cell(source: str, namespace: Mapping[str, Any]) -> CellPlan:
    """Plan for `source` (already transformed by IPython), reading names from `namespace`.

    Raises cell.body.CellSyntaxError or cell.magics.UnreadableMagic; never changes anything.
    """
    from llm_magic.predict.calls import find_load_calls

    tree = parse_body(source)
    analysed = expand_line_magics(tree)
    targets = tuple(assignment_targets(analysed))
    reads = analyse_reads(analysed)
    read_first = tuple(path for path in targets if reads.before_binding(path))
    # The load calls are read from the expanded code, so `%time model = X.from_pretrained(...)`
    # is predicted like the plain assignment.
    code = source if analysed is tree else ast.unparse(analysed)
    calls = tuple(find_load_calls(code, namespace))
    return CellPlan(source, tree, analysed, targets, read_first, calls, reads)


def run_body(shell, plan: CellPlan) -> Any:
    """Run the body as IPython would, returning a trailing expression's value (like `%%time`)."""
    # Compiled under a name IPython caches, so tracebacks show the body's lines.
    filename = shell.compile.cache(plan.source, shell.execution_count)
    statements, trailing = last_expression(plan.tree)
    flags = shell.compile.flags
    exec(compile(statements, filename, "exec", flags=flags, dont_inherit=True), shell.user_global_ns, shell.user_ns)
    if trailing is not None:
        return eval(compile(trailing, filename, "eval", flags=flags, dont_inherit=True), shell.user_global_ns, shell.user_ns)
    return None


def release_targets(namespace: dict, paths: list[TargetPath] | tuple[TargetPath, ...], extra_names: list[str] = ()) -> list[Target]:
    """The current values at `paths` (and at `extra_names`) that hold tensors, as release targets.

    An object under several paths (`model`, `box.model`) is one target with all its bindings.
    """
    candidates = list(paths) + [TargetPath(name) for name in extra_names]
    grouped: dict[int, tuple[str, Any, list[Binding]]] = {}
    for path in candidates:
        try:
            value = resolve(path, namespace)
        except Unresolvable:
            continue
        if id(value) not in grouped:
            if not holds_tensors(value):
                continue
            grouped[id(value)] = (path.text, value, [])
        binding = Binding(path.text, unbinder(path, namespace))
        if all(b.label != binding.label for b in grouped[id(value)][2]):
            grouped[id(value)][2].append(binding)
    return [Target(label, value, tuple(bindings)) for label, value, bindings in grouped.values()]


def bound_models(namespace: Mapping[str, Any], paths) -> list[tuple[str, Any]]:
    """(name, model) for each target that now holds a torch model (pipelines: their .model)."""
    from llm_magic.measure.placement import find_model

    found: list[tuple[str, Any]] = []
    for path in paths:
        try:
            model = find_model(resolve(path, namespace))
        except Unresolvable:
            continue
        if model is not None and all(model is not other for _, other in found):
            found.append((path.text, model))
    return found
