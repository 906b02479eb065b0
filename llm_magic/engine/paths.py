"""Paths to objects in the user's namespace, as a user writes them: `model`, `results[0].model`,
`cache["m"]`. Resolving one runs only what the user's own code would run; clearing one drops a
single reference and never raises.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping


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



# A closure cell's path is shown as the path the user can evaluate, then the free variable's name
# as a note: "gen.__closure__[0].cell_contents (closure `m`)". Written by engine/contents.py; read
# back here, so that a path pasted from a report works as it is.
_CLOSURE_NOTE = re.compile(r"\s*\(closure `[^`]*`\)\s*$")


def closure_note(variable: str) -> str:
    return f" (closure `{variable}`)"


def is_closure_note(text: str) -> bool:
    return _CLOSURE_NOTE.fullmatch(text) is not None


def parse_target(text: str) -> TargetPath:
    """Parse a user-typed name such as `model` or `results[0].model` (for `%llmfree`)."""
    try:
        node = ast.parse(_CLOSURE_NOTE.sub("", text.strip()), mode="eval").body
    except (SyntaxError, RecursionError):
        raise ValueError(f"{_shorten(text)!r} is not a name") from None
    path = target_path(node)
    if path is None:
        raise ValueError(f"{_shorten(text)!r} is not a simple name (use NAME, NAME.attr or NAME['key'])")
    return path


def _shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Unresolvable(LookupError):
    """The target does not exist (yet) in the namespace. `reason` says which part is missing:
    "name 'd' is not defined", "d has no key 'x'", "d.cfg has no attribute 'm'"."""

    def __init__(self, text: str, reason: str | None = None) -> None:
        super().__init__(text)
        self.reason = reason or f"name {text!r} is not defined"


def resolve_parent(path: TargetPath, namespace: Mapping[str, Any]) -> tuple[Any, Step | None]:
    """(container, last step) for `path`: the namespace itself and None for a bare name.

    Attribute steps run the user's own attribute access, as the body itself would; any
    failure means "not there", never an exception out of the scan.
    """
    if path.root not in namespace:
        raise Unresolvable(path.text, f"name {path.root!r} is not defined")
    if not path.steps:
        return namespace, None
    current = namespace[path.root]
    for index, step in enumerate(path.steps[:-1]):
        current = _follow(current, step, path, index)
    return current, path.steps[-1]


def _follow(container: Any, step: Step, path: TargetPath, index: int) -> Any:
    try:
        if step.kind == "attr":
            return getattr(container, step.key)
        return container[step.key]
    except Exception as error:
        raise Unresolvable(path.text, _missing(path, index, error)) from None


def _missing(path: TargetPath, index: int, error: Exception) -> str:
    """What is missing at step `index` of `path`, in the user's terms."""
    where = TargetPath(path.root, path.steps[:index]).text
    step = path.steps[index]
    if step.kind == "attr" and isinstance(error, AttributeError):
        return f"{where} has no attribute {step.key!r}"
    if step.kind == "item" and isinstance(error, (KeyError, IndexError)):
        return f"{where} has no {'key' if isinstance(error, KeyError) else 'item'} {step.key!r}"
    shown = f".{step.key}" if step.kind == "attr" else f"[{step.key!r}]"
    return f"reading {where}{shown} raised {type(error).__name__}"


def resolve(path: TargetPath, namespace: Mapping[str, Any]) -> Any:
    """The current value at `path`, or Unresolvable."""
    parent, step = resolve_parent(path, namespace)
    if step is None:
        return namespace[path.root]
    return _follow(parent, step, path, len(path.steps) - 1)



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
