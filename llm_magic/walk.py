"""Walking the user's object graph safely, with paths a user could type.

The namespace of a notebook is full of odd objects: proxies, objects whose `__getattr__`,
`__eq__`, `__hash__`, `__len__` or `__bool__` raise or lie, containers of a million items,
cycles. Everything here reads object graphs through the C-level slots (`dict.items`,
`list.__iter__`, `object.__getattribute__` for `__dict__`, member descriptors for `__slots__`)
so that no user-defined Python method runs, and it catches what still can go wrong. Visits are
bounded by a budget so one huge container cannot stall a cell.
"""

from __future__ import annotations

import functools
import types
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

# Values that can never hold a tensor: skipped without a visit.
ATOMIC_TYPES = frozenset(
    {int, float, complex, str, bytes, bytearray, bool, type(None), range, slice, memoryview}
)

# Objects we never walk into: code and namespaces of the program itself, not user data. A
# module object's globals would pull the whole interpreter into the walk.
OPAQUE_TYPES = (
    type,
    types.ModuleType,
    types.FunctionType,
    types.BuiltinFunctionType,
    types.CodeType,
    types.FrameType,
    types.TracebackType,
    types.GeneratorType,
    types.CoroutineType,
    types.AsyncGeneratorType,
    weakref.ReferenceType,
    weakref.ProxyType,
    weakref.CallableProxyType,
)

DEFAULT_BUDGET = 200_000


def safe_repr_key(key: Any) -> str:
    """How a dict key is written in a path: `['name']`, `[3]`, or `[<Key>]` for the rest."""
    if type(key) in (str, int, bool, float, type(None)):
        return f"[{key!r}]"
    if type(key) is tuple and all(type(k) in (str, int) for k in key):
        return f"[{key!r}]"
    return f"[<{type(key).__name__}>]"


def instance_dict(obj: Any) -> dict | None:
    """The object's real `__dict__`, without running its `__getattr__`/`__getattribute__`."""
    try:
        attrs = object.__getattribute__(obj, "__dict__")
    except Exception:
        return None
    return attrs if type(attrs) is dict else None


def slot_values(obj: Any) -> Iterator[tuple[str, Any]]:
    """(name, value) for each filled `__slots__` member, read through the member descriptor."""
    for cls in type(obj).__mro__:
        slots = cls.__dict__.get("__slots__", ())
        if isinstance(slots, str):
            slots = (slots,)
        for name in slots:
            descriptor = cls.__dict__.get(name)
            if type(descriptor) is not types.MemberDescriptorType:
                continue
            try:
                yield name, descriptor.__get__(obj, cls)
            except Exception:  # an empty slot raises AttributeError
                continue


def children(obj: Any) -> Iterator[tuple[str, Any]]:
    """Yield (path step, child) for what `obj` holds: `.attr`, `[0]`, `['key']`.

    Steps are written so that `name + step` is an expression the user can type, where one
    exists (set members and dict keys that are objects get a descriptive step instead).
    """
    kind = type(obj)
    if kind in ATOMIC_TYPES or issubclass(kind, OPAQUE_TYPES):
        return
    try:
        if issubclass(kind, dict):
            for key, value in dict.items(obj):
                if type(key) not in ATOMIC_TYPES and type(key) is not tuple:
                    yield f".keys() item <{type(key).__name__}>", key
                yield safe_repr_key(key), value
        elif issubclass(kind, (list, tuple)):
            iterator = list.__iter__(obj) if issubclass(kind, list) else tuple.__iter__(obj)
            for index, value in enumerate(iterator):
                if type(value) not in ATOMIC_TYPES:
                    yield f"[{index}]", value
        elif issubclass(kind, (set, frozenset)):
            iterator = set.__iter__(obj) if issubclass(kind, set) else frozenset.__iter__(obj)
            for value in iterator:
                if type(value) not in ATOMIC_TYPES:
                    yield " (a set member)", value
        elif kind is types.MethodType:
            yield ".__self__", obj.__self__
        elif kind is functools.partial:
            yield ".func", obj.func
            for index, value in enumerate(obj.args):
                yield f".args[{index}]", value
            for key, value in obj.keywords.items():
                yield f".keywords[{key!r}]", value
        else:
            attrs = instance_dict(obj)
            if attrs is not None:
                for name, value in dict.items(attrs):
                    if type(value) not in ATOMIC_TYPES:
                        step = f".{name}" if type(name) is str and name.isidentifier() else f".__dict__[{name!r}]"
                        yield step, value
            for name, value in slot_values(obj):
                if type(value) not in ATOMIC_TYPES:
                    yield f".{name}", value
    except Exception:
        # A container mutated under us, or a C extension type that refuses: stop here, the
        # walk goes on with the siblings.
        return


@dataclass
class WalkStats:
    visited: int = 0
    truncated: bool = False  # the budget ran out before the graph did
    seen: set[int] = field(default_factory=set)


def breadth_first(
    roots: Iterable[tuple[str, Any]],
    *,
    is_leaf: Callable[[Any], bool],
    budget: int = DEFAULT_BUDGET,
    stats: WalkStats | None = None,
) -> Iterator[tuple[str, Any]]:
    """Yield (path, object) for every leaf reachable from `roots`, shortest path first.

    A leaf (a tensor, a module: whatever `is_leaf` says) is yielded once and not walked into.
    Pass the same `stats` to a second call to go on with the objects already seen excluded:
    that is how hidden holders are told from visible ones.
    """
    stats = stats if stats is not None else WalkStats()
    queue: deque[tuple[str, Any]] = deque()
    for path, obj in roots:
        queue.append((path, obj))
    while queue:
        path, obj = queue.popleft()
        if id(obj) in stats.seen:
            continue
        stats.seen.add(id(obj))
        stats.visited += 1
        if stats.visited > budget:
            stats.truncated = True
            return
        if is_leaf(obj):
            yield path, obj
            continue
        for step, child in children(obj):
            if id(child) not in stats.seen:
                queue.append((path + step, child))


def find_paths(
    roots: Iterable[tuple[str, Any]],
    wanted: set[int],
    *,
    stop: Callable[[Any], bool] = lambda _: False,
    budget: int = DEFAULT_BUDGET,
    stats: WalkStats | None = None,
) -> dict[int, list[str]]:
    """Every path (from any root) that reaches an object whose id is in `wanted`.

    Unlike `breadth_first`, an object reached again by another route is recorded again, so a
    model held both by `model` and `results[0].model` is named by both. Objects for which
    `stop` is true are not walked into (tensors: nothing of interest inside).
    """
    stats = stats if stats is not None else WalkStats()
    found: dict[int, list[str]] = {}
    queue: deque[tuple[str, Any]] = deque()
    for path, obj in roots:
        if id(obj) in wanted:
            found.setdefault(id(obj), []).append(path)
        queue.append((path, obj))
    while queue:
        path, obj = queue.popleft()
        if id(obj) in stats.seen:
            continue
        stats.seen.add(id(obj))
        stats.visited += 1
        if stats.visited > budget:
            stats.truncated = True
            break
        if stop(obj):
            continue
        for step, child in children(obj):
            if id(child) in wanted:
                found.setdefault(id(child), []).append(path + step)
            if id(child) not in stats.seen:
                queue.append((path + step, child))
    return found
