"""Reading a cell body before it runs: its syntax, and the targets it will assign.

`%%llmload` must free what the body is about to replace *before* the body runs, so it reads
the assignment targets from the AST: `model = ...`, `tok, model = ...`, `self.model = ...`,
`cache["m"] = ...`. Only targets a user can name simply are supported (a name followed by
attributes and constant subscripts); anything else is left alone rather than guessed.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping


class CellSyntaxError(ValueError):
    """The body does not parse; raised before anything is released."""


@dataclass(frozen=True)
class Step:
    kind: str  # "attr" or "item"
    key: Any  # attribute name, or the constant subscript key


@dataclass(frozen=True)
class TargetPath:
    """A simple assignment target: a root name then attribute/constant-subscript steps."""

    root: str
    steps: tuple[Step, ...] = ()

    @property
    def text(self) -> str:
        parts = [self.root]
        for step in self.steps:
            parts.append(f".{step.key}" if step.kind == "attr" else f"[{step.key!r}]")
        return "".join(parts)

    def __str__(self) -> str:
        return self.text


def parse_body(source: str, filename: str = "<llmload>") -> ast.Module:
    """Parse the body, turning a SyntaxError into a one-line CellSyntaxError."""
    try:
        return ast.parse(source, filename=filename)
    except SyntaxError as error:
        where = f"line {error.lineno}" if error.lineno else "the body"
        raise CellSyntaxError(f"syntax error in the cell body at {where}: {error.msg}") from None
    except RecursionError:  # Python cannot compile it either: expressions nested too deeply
        raise CellSyntaxError("the cell body is nested too deeply for Python to compile") from None


def _constant_key(node: ast.expr) -> tuple[bool, Any]:
    if isinstance(node, ast.Constant) and isinstance(node.value, (str, int, bytes, bool, type(None))):
        return True, node.value
    if (
        isinstance(node, ast.UnaryOp)
        and isinstance(node.op, ast.USub)
        and isinstance(node.operand, ast.Constant)
        and type(node.operand.value) is int
    ):
        return True, -node.operand.value
    return False, None


def target_path(node: ast.expr) -> TargetPath | None:
    """The TargetPath an expression node names, or None if it is not that simple."""
    steps: list[Step] = []
    while True:
        if isinstance(node, ast.Name):
            return TargetPath(node.id, tuple(reversed(steps)))
        if isinstance(node, ast.Attribute):
            steps.append(Step("attr", node.attr))
            node = node.value
        elif isinstance(node, ast.Subscript):
            ok, key = _constant_key(node.slice)
            if not ok:
                return None
            steps.append(Step("item", key))
            node = node.value
        else:
            return None


def _flatten(target: ast.expr) -> Iterator[ast.expr]:
    if isinstance(target, (ast.Tuple, ast.List)):
        for element in target.elts:
            yield from _flatten(element)
    elif isinstance(target, ast.Starred):
        yield from _flatten(target.value)
    else:
        yield target


# Nodes that open a new scope: assignments inside them do not replace anything in the user
# namespace, so they are not read.
_NEW_SCOPES = (
    ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda,
    ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp,
)


def assignment_targets(tree: ast.Module) -> list[TargetPath]:
    """Simple targets the body assigns at cell level, in order of appearance, without duplicates.

    An explicit stack, not ast.NodeVisitor: a body Python compiles (`x = 1 + 1 + ...` with
    hundreds of terms) can nest deeper than the recursion limit allows a visitor to go.
    """
    targets: list[TargetPath] = []
    known: set[TargetPath] = set()
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, _NEW_SCOPES):
            continue
        if isinstance(node, ast.Assign):
            assigned = list(node.targets)
        elif isinstance(node, ast.AnnAssign) and node.value is not None or isinstance(node, ast.NamedExpr):
            assigned = [node.target]
        else:
            assigned = []
        for target in assigned:
            for element in _flatten(target):
                path = target_path(element)
                if path is not None and path not in known:
                    known.add(path)
                    targets.append(path)
        stack.extend(reversed(list(ast.iter_child_nodes(node))))
    return targets


def parse_target(text: str) -> TargetPath:
    """Parse a user-typed name such as `model` or `results[0].model` (for `%llmfree`)."""
    try:
        node = ast.parse(text.strip(), mode="eval").body
    except (SyntaxError, RecursionError):
        raise ValueError(f"{_shorten(text)!r} is not a name") from None
    path = target_path(node)
    if path is None:
        raise ValueError(f"{_shorten(text)!r} is not a simple name (use NAME, NAME.attr or NAME['key'])")
    return path


def _shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Unresolvable(LookupError):
    """The target does not exist (yet) in the namespace."""


def resolve_parent(path: TargetPath, namespace: Mapping[str, Any]) -> tuple[Any, Step | None]:
    """(container, last step) for `path`: the namespace itself and None for a bare name.

    Attribute steps run the user's own attribute access, as the body itself would; any
    failure means "not there", never an exception out of the scan.
    """
    if path.root not in namespace:
        raise Unresolvable(path.text)
    if not path.steps:
        return namespace, None
    current = namespace[path.root]
    for step in path.steps[:-1]:
        current = _follow(current, step, path)
    return current, path.steps[-1]


def _follow(container: Any, step: Step, path: TargetPath) -> Any:
    try:
        if step.kind == "attr":
            return getattr(container, step.key)
        return container[step.key]
    except Exception:
        raise Unresolvable(path.text) from None


def resolve(path: TargetPath, namespace: Mapping[str, Any]) -> Any:
    """The current value at `path`, or Unresolvable."""
    parent, step = resolve_parent(path, namespace)
    if step is None:
        return namespace[path.root]
    return _follow(parent, step, path)


def last_expression(tree: ast.Module) -> tuple[ast.Module, ast.Expression | None]:
    """Split off a trailing expression statement, so its value can be shown like `%%time` does."""
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        body = ast.Module(body=tree.body[:-1], type_ignores=[])
        return body, ast.Expression(tree.body[-1].value)
    return tree, None


def unbinder(path: TargetPath, namespace: dict) -> Callable[[], None]:
    """A function that drops the reference at `path` (it holds the container, not the value).

    A name or a dict key is deleted; a list slot is set to None (deleting would shift the
    items after it); an attribute is deleted, or set to None where it cannot be deleted.
    The container is judged by its real type (its `__class__` can raise or lie), and the
    function never raises: a container that refuses keeps its reference, and the release's
    weak-reference check then reports the object as still held, by this very path.
    """
    parent, step = resolve_parent(path, namespace)
    if step is None:
        return lambda: namespace.pop(path.root, None)
    if step.kind == "attr":
        def clear_attribute() -> None:
            try:
                delattr(parent, step.key)
            except Exception:
                try:
                    setattr(parent, step.key, None)
                except Exception:
                    pass

        return clear_attribute
    kind = type(parent)
    if issubclass(kind, (list, tuple)) or type(step.key) is int and not _is_mapping_type(kind):
        def clear_slot() -> None:
            try:
                parent[step.key] = None
            except Exception:
                pass

        return clear_slot

    def clear_item() -> None:
        try:
            del parent[step.key]
        except Exception:
            pass

    return clear_item


def _is_mapping_type(kind: type) -> bool:
    try:
        return issubclass(kind, Mapping)
    except Exception:  # a metaclass whose subclass check raises
        return False
