"""Reading one argument of a call as a value, without running any code.

An expression is resolved only when that needs no code to run: a literal, arithmetic on
literals, a plain name bound in the user's namespace, a module attribute such as
`torch.bfloat16` (read with `inspect.getattr_static`, so no property or `__getattr__` runs), or a
container of those. Anything else (a call, a subscript, an f-string) is kept as its source text
and marked unknown.
"""

from __future__ import annotations

import ast
import inspect
import operator
import types
from dataclasses import dataclass
from typing import Any, Mapping

# Arithmetic allowed on literal numbers (`20 * 1024**3`): cannot run user code.
_BINARY_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Pow: operator.pow,
}
_MAX_EXPONENT = 128  # `2 ** 10**9` would hang the pre-flight


class Unresolvable(Exception):
    """An expression we will not evaluate (it would need code to run)."""


@dataclass(frozen=True)
class Arg:
    """One argument of a call as written, and its value when that can be known without running code.

    `present` False: the argument was not written (and no `**kwargs` could hide it); `value` is
    then None. `known` False: written (or possibly inside `**kwargs`), but its value needs code to
    run; `source` holds the text.
    """

    present: bool = False
    known: bool = True
    value: Any = None
    source: str | None = None
    origin: str = "absent"  # "absent" | "literal" | "namespace" | "attribute" | "kwargs" | "unknown"

    def to_dict(self) -> dict[str, Any]:
        return {
            "present": self.present,
            "known": self.known,
            "value": plain(self.value) if self.known else None,
            "source": self.source,
            "origin": self.origin,
        }


ABSENT = Arg()


def plain(value: Any) -> Any:
    """A JSON-friendly copy of a resolved value (dtypes and other objects become strings)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [plain(v) for v in value]
    return str(value)


class Resolver:
    def __init__(self, source: str, namespace: Mapping[str, Any]):
        self.source = source
        self.namespace = namespace

    def text(self, node: ast.AST) -> str:
        return ast.get_source_segment(self.source, node) or ast.unparse(node)

    def arg(self, node: ast.AST) -> Arg:
        text = self.text(node)
        try:
            return Arg(present=True, known=True, value=ast.literal_eval(node), source=text, origin="literal")
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            pass
        try:
            value, origin = self.value(node)
        except Unresolvable:
            return Arg(present=True, known=False, value=None, source=text, origin="unknown")
        return Arg(present=True, known=True, value=value, source=text, origin=origin)

    def value(self, node: ast.AST) -> tuple[Any, str]:
        """(value, origin) of a node made only of literals, bound names and module attributes."""
        if isinstance(node, ast.Constant):
            return node.value, "literal"
        if isinstance(node, ast.Name):
            if node.id in self.namespace:
                return self.namespace[node.id], "namespace"
            raise Unresolvable(node.id)
        if isinstance(node, ast.Attribute):
            return self.attribute(node), "attribute"
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            operand, origin = self.value(node.operand)
            if isinstance(operand, (int, float)) and not isinstance(operand, bool):
                return (-operand if isinstance(node.op, ast.USub) else operand), origin
            raise Unresolvable("unary")
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS:
            left, lo = self.value(node.left)
            right, ro = self.value(node.right)
            numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (left, right))
            if not numbers:
                raise Unresolvable("binop")
            if isinstance(node.op, ast.Pow) and abs(right) > _MAX_EXPONENT:
                raise Unresolvable("huge power")
            try:
                return _BINARY_OPS[type(node.op)](left, right), _merge(lo, ro)
            except (ArithmeticError, ValueError):
                raise Unresolvable("arithmetic") from None
        if isinstance(node, ast.Dict):
            out: dict[Any, Any] = {}
            origin = "literal"
            for key_node, value_node in zip(node.keys, node.values):
                if key_node is None:  # `{**other}`
                    merged, o = self.value(value_node)
                    if not isinstance(merged, Mapping):
                        raise Unresolvable("dict unpack")
                    out.update(merged)
                else:
                    key, ko = self.value(key_node)
                    try:
                        hash(key)
                    except TypeError:
                        raise Unresolvable("unhashable key") from None
                    out[key], o = self.value(value_node)
                    origin = _merge(origin, ko)
                origin = _merge(origin, o)
            return out, origin
        if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
            items, origin = [], "literal"
            for element in node.elts:
                if isinstance(element, ast.Starred):
                    raise Unresolvable("starred")
                value, o = self.value(element)
                items.append(value)
                origin = _merge(origin, o)
            kind = {ast.List: list, ast.Tuple: tuple, ast.Set: set}[type(node)]
            try:
                return kind(items), origin
            except TypeError:
                raise Unresolvable("unhashable") from None
        raise Unresolvable(type(node).__name__)

    def attribute(self, node: ast.Attribute) -> Any:
        """`torch.bfloat16`, `transformers.AutoModel`: an attribute chain rooted at a module.

        Only modules are walked, and only through `inspect.getattr_static`, so no property,
        descriptor or module `__getattr__` runs. The root is the namespace's binding, or, for the
        well-known `torch` / `transformers` names left unbound, the module itself (imported lazily:
        the cell is about to import them anyway).
        """
        chain: list[str] = []
        current: ast.AST = node
        while isinstance(current, ast.Attribute):
            chain.append(current.attr)
            current = current.value
        if not isinstance(current, ast.Name):
            raise Unresolvable("attribute root")
        chain.reverse()
        root = _module_root(current.id, self.namespace)
        obj = root
        for name in chain:
            if not isinstance(obj, types.ModuleType):
                raise Unresolvable("attribute of a non-module")
            try:
                obj = inspect.getattr_static(obj, name)
            except AttributeError:
                # Lazy modules (transformers) keep most names out of their `__dict__`; asking a lazy
                # module for a class is what `import` itself does, and runs no user code.
                obj = _lazy_module_attribute(obj, name)
        return obj


def _merge(a: str, b: str) -> str:
    if a == b:
        return a
    for origin in ("namespace", "attribute"):
        if origin in (a, b):
            return origin
    return a


def _module_root(name: str, namespace: Mapping[str, Any]) -> types.ModuleType:
    if name in namespace:
        value = namespace[name]
        if isinstance(value, types.ModuleType):
            return value
        raise Unresolvable("root is not a module")
    if name in ("torch", "transformers"):
        import importlib

        return importlib.import_module(name)
    raise Unresolvable(name)


def _lazy_module_attribute(module: types.ModuleType, name: str) -> Any:
    import sys

    transformers = sys.modules.get("transformers")
    if transformers is not None and module is transformers:
        try:
            return getattr(transformers, name)
        except (AttributeError, ImportError, RuntimeError):
            pass
    raise Unresolvable(f"{module.__name__}.{name}")
