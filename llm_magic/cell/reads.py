"""Which targets a cell reads before it rebinds them: those must not be released first.

`model = get_peft_model(model, config)` replaces `model`, but only after reading it. Releasing
the old value before the cell runs would leave the cell a NameError and the user without their
model. The analysis follows the body in statement order, tracking the paths (`model`,
`models["llama"]`) the cell has *surely* bound so far; a load of a path related to a target
(the target itself, something inside it, or a container holding it) while the target is not
surely bound is a read of the value the cell started with. Where the order cannot be known
statically it assumes the read comes first (keeps the value):
- branches: a path is surely bound after `if`/`try` only if every way through binds it;
- loops may run zero times, so what they bind is not sure after them;
- a function or class body defined in the cell may run at any time: every global name it
  loads counts as read where it is defined;
- `del name` and `name += ...` read the name.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from typing import Iterable

from llm_magic.engine.paths import TargetPath, target_path

_COMPREHENSIONS = (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)

Path = tuple  # (root, Step, Step, ...): a TargetPath as a tuple, so prefixes compare as slices
Bound = frozenset  # of Path: what the cell has surely bound at some point of its run


def _key(path: TargetPath) -> Path:
    return (path.root, *path.steps)


def _related(a: Path, b: Path) -> bool:
    """One path is inside the other: reading either may read the value at the other."""
    shorter = min(len(a), len(b))
    return a[:shorter] == b[:shorter]


def _covered(path: Path, bound: Bound) -> bool:
    """The value at `path` is the cell's own: it or a container of it was bound by the cell."""
    return any(path[: len(b)] == b for b in bound)


@dataclass
class Reads:
    """Every load of the body, with what the cell had surely bound when it happened."""

    loads: list[tuple[Path, Bound]] = field(default_factory=list)

    def add(self, path: Path, bound: Bound) -> None:
        if not _covered(path, bound):
            self.loads.append((path, bound))

    def before_binding(self, target: TargetPath) -> bool:
        """Does the body read the value `target` had before the cell (or may it)?"""
        key = _key(target)
        return any(_related(path, key) and not _covered(key, bound) for path, bound in self.loads)


def analyse_reads(tree: ast.Module) -> Reads:
    reads = Reads()
    _block(tree.body, frozenset(), reads)
    return reads


def _block(statements: Iterable[ast.stmt], bound: Bound, reads: Reads) -> Bound:
    """Follow `statements` in order; return the paths surely bound after them."""
    for statement in statements:
        bound = _statement(statement, bound, reads)
    return bound


def _statement(node: ast.stmt, bound: Bound, reads: Reads) -> Bound:
    # One kind at a time, because what is bound and when depends on the kind; anything not
    # listed is read whole and binds nothing (conservative).
    if isinstance(node, (ast.Assign, ast.AnnAssign)):
        if node.value is None:  # `x: int` binds nothing
            return bound
        _read(node.value, bound, reads)
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        for target in targets:
            _read_target_parts(target, bound, reads)
        return bound | _bound_by(targets)
    if isinstance(node, ast.AugAssign):
        _read(node.value, bound, reads)
        _read_target_parts(node.target, bound, reads)
        _read_path_of(node.target, bound, reads)  # `model += x` reads model first
        return bound | _bound_by([node.target])
    if isinstance(node, ast.Delete):
        for target in node.targets:
            _read_target_parts(target, bound, reads)
            _read_path_of(target, bound, reads)
        gone = _bound_by(node.targets)
        return frozenset(b for b in bound if not any(b[: len(g)] == g for g in gone))
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return bound | {((alias.asname or alias.name).split(".")[0],) for alias in node.names if alias.name != "*"}
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        _read_definition(node, bound, reads)
        return bound | {(node.name,)}
    if isinstance(node, ast.If):
        _read(node.test, bound, reads)
        return _block(node.body, bound, reads) & _block(node.orelse, bound, reads)
    if isinstance(node, (ast.For, ast.AsyncFor)):
        _read(node.iter, bound, reads)
        _read_target_parts(node.target, bound, reads)
        _block(node.body, bound | _bound_by([node.target]), reads)
        _block(node.orelse, bound, reads)
        return bound
    if isinstance(node, ast.While):
        _read(node.test, bound, reads)
        _block(node.body, bound, reads)
        _block(node.orelse, bound, reads)
        return bound
    if isinstance(node, (ast.With, ast.AsyncWith)):
        for item in node.items:
            _read(item.context_expr, bound, reads)
            if item.optional_vars is not None:
                _read_target_parts(item.optional_vars, bound, reads)
                bound = bound | _bound_by([item.optional_vars])
        return _block(node.body, bound, reads)
    if isinstance(node, ast.Try) or type(node).__name__ == "TryStar":
        after = _block(node.orelse, _block(node.body, bound, reads), reads)
        for handler in node.handlers:
            if handler.type is not None:
                _read(handler.type, bound, reads)
            # A handler may run after any statement of the body: only what was bound before
            # the try is sure there.
            after &= _block(handler.body, bound | ({(handler.name,)} if handler.name else set()), reads)
        _block(node.finalbody, bound, reads)
        return after
    if isinstance(node, (ast.Global, ast.Nonlocal, ast.Pass, ast.Break, ast.Continue)):
        return bound
    _read(node, bound, reads)  # expressions, return, raise, assert, match: read whole
    return bound


def _read(node: ast.AST, bound: Bound, reads: Reads) -> None:
    """Record the paths `node` loads: `model.generate` is one load of that path.

    Nested functions, lambdas and comprehensions count their free names (what they load from
    the cell's namespace), not their own parameters and locals. An explicit stack: bodies that
    Python compiles can nest deeper than the recursion limit.
    """
    stack = [node]
    while stack:
        current = stack.pop()
        if isinstance(current, (ast.Attribute, ast.Subscript)) and isinstance(current.ctx, ast.Load):
            path = target_path(current)
            if path is not None:
                reads.add(_key(path), bound)
                continue
        elif isinstance(current, ast.Name) and isinstance(current.ctx, ast.Load):
            reads.add((current.id,), bound)
        elif isinstance(current, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            _read_definition(current, bound, reads)
            continue
        elif isinstance(current, _COMPREHENSIONS):
            for name in _free_names(current):
                reads.add((name,), bound)
            continue
        stack.extend(ast.iter_child_nodes(current))


def _read_definition(node: ast.AST, bound: Bound, reads: Reads) -> None:
    """A def, class or lambda: decorators, defaults and bases are read now; the body at any time."""
    for decorator in getattr(node, "decorator_list", ()):
        _read(decorator, bound, reads)
    arguments = getattr(node, "args", None)
    if isinstance(arguments, ast.arguments):
        for default in [*arguments.defaults, *(d for d in arguments.kw_defaults if d is not None)]:
            _read(default, bound, reads)
    for base in [*getattr(node, "bases", ()), *(k.value for k in getattr(node, "keywords", ()))]:
        _read(base, bound, reads)
    # The body may run before the cell rebinds a name it loads (called right away), so what it
    # loads counts as read now, with nothing surely bound.
    for name in _free_names(node):
        reads.add((name,), frozenset())


def _free_names(scope: ast.AST) -> set[str]:
    """Names a function, lambda, class or comprehension loads from outside itself."""
    local: set[str] = set()
    declared_global: set[str] = set()
    loaded: set[str] = set()
    arguments = getattr(scope, "args", None)
    if isinstance(arguments, ast.arguments):
        every = [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs, arguments.vararg, arguments.kwarg]
        local.update(arg.arg for arg in every if arg is not None)
    body = getattr(scope, "body", [])
    stack: list = list(body) if isinstance(body, list) else [body]
    stack += [getattr(scope, name, None) for name in ("elt", "key", "value")]
    for generator in getattr(scope, "generators", ()):
        local.update(name for name, *_ in _bound_by([generator.target]))
        stack += [generator.iter, *generator.ifs]
    while stack:
        current = stack.pop()
        if current is None:
            continue
        if isinstance(current, ast.Name):
            (loaded if isinstance(current.ctx, ast.Load) else local).add(current.id)
        elif isinstance(current, ast.Global):
            declared_global.update(current.names)
        elif isinstance(current, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda, *_COMPREHENSIONS)):
            if not isinstance(current, (ast.Lambda, *_COMPREHENSIONS)):
                local.add(current.name)
            loaded |= _free_names(current)
            continue
        elif isinstance(current, (ast.Import, ast.ImportFrom)):
            local.update((alias.asname or alias.name).split(".")[0] for alias in current.names)
        elif isinstance(current, ast.ExceptHandler) and current.name:
            local.add(current.name)
        stack.extend(ast.iter_child_nodes(current))
    return loaded - (local - declared_global)


def _bound_by(targets: Iterable[ast.AST]) -> set[Path]:
    """Paths an assignment binds: `model`, `tok, model`, `*rest`, `box.model`, `d["k"]`."""
    paths: set[Path] = set()
    stack = list(targets)
    while stack:
        target = stack.pop()
        if isinstance(target, (ast.Tuple, ast.List)):
            stack.extend(target.elts)
        elif isinstance(target, ast.Starred):
            stack.append(target.value)
        else:
            path = target_path(target)
            if path is not None:
                paths.add(_key(path))
    return paths


def _read_target_parts(target: ast.AST, bound: Bound, reads: Reads) -> None:
    """What assigning to `target` reads besides its own old value: indices (`i` in `d[i] = x`)
    and containers that are not simple paths (`boxes[i].model = x` reads `boxes`, `i`).

    The container of a simple target (`box` in `box.model = x`) is only used to store into: it
    reads nothing that the assignment does not replace.
    """
    if isinstance(target, (ast.Tuple, ast.List)):
        for element in target.elts:
            _read_target_parts(element, bound, reads)
    elif isinstance(target, ast.Starred):
        _read_target_parts(target.value, bound, reads)
    elif isinstance(target, (ast.Attribute, ast.Subscript)) and target_path(target) is None:
        _read(target.value, bound, reads)
        if isinstance(target, ast.Subscript):
            _read(target.slice, bound, reads)


def _read_path_of(target: ast.AST, bound: Bound, reads: Reads) -> None:
    """`del model`, `model += 1`: the target's own old value is read."""
    for path in _bound_by([target]):
        reads.add(path, bound)
