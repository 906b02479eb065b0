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
import gc
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


def type_name(obj: Any, *, qualified: bool = False) -> str:
    """The object's class name, read with type(): an object's `__class__` can raise or lie.

    qualified: with its module ('transformers.models.llama.modeling_llama.LlamaForCausalLM').
    """
    kind = type(obj)
    if not qualified or kind.__module__ in ("builtins", None):
        return kind.__qualname__
    return f"{kind.__module__}.{kind.__qualname__}"


def safe_repr_key(key: Any) -> str:
    """How a dict key is written in a path: `['name']`, `[3]`, or `[<Key>]` for the rest."""
    if type(key) in (str, int, bool, float, type(None)):
        return f"[{key!r}]"
    if type(key) is tuple and all(type(k) in (str, int) for k in key):
        return f"[{key!r}]"
    return f"[<{type(key).__name__}>]"


# How CPython exposes a real instance `__dict__`: a C-level descriptor, never user code.
_DICT_DESCRIPTORS = (types.GetSetDescriptorType, types.MemberDescriptorType)
# A class's own namespace and MRO, read past any metaclass (which could define them as
# properties).
_class_dict = type.__dict__["__dict__"].__get__
_class_mro = type.__dict__["__mro__"].__get__


@dataclass(frozen=True)
class _Layout:
    """What a type's instances can hold, read once per type from its classes' namespaces."""

    real_dict: bool  # has a `__dict__` that is CPython's own (not a user property)
    slots: tuple[tuple[str, Any, type], ...]  # (name, member descriptor, owner) per slot


# Per type, so a walk of 200,000 objects does not scan each one's MRO again. Keyed by id with
# a weak reference to check it, not a WeakKeyDictionary: that would compare classes with
# their metaclass's `__eq__`/`__hash__`, which can lie. A class the user deletes (and what its
# attributes hold) is not kept alive by the cache.
_LAYOUTS: dict[int, tuple[weakref.ref, _Layout]] = {}


def _layout(kind: type) -> _Layout:
    entry = _LAYOUTS.get(id(kind))
    if entry is not None and entry[0]() is kind:
        return entry[1]
    mro = _class_mro(kind)
    real_dict, slots = False, []
    for cls in mro:  # the first class that defines `__dict__` decides
        descriptor = _class_dict(cls).get("__dict__")
        if descriptor is not None:
            real_dict = type(descriptor) in _DICT_DESCRIPTORS
            break
    for cls in mro:
        namespace = _class_dict(cls)
        declared = namespace.get("__slots__", ())
        if type(declared) is str:
            declared = (declared,)
        try:
            names = [name for name in declared if type(name) is str]
        except Exception:
            names = []
        for name in names:
            member = namespace.get(name)
            if type(member) is types.MemberDescriptorType:
                slots.append((name, member, cls))
    layout = _Layout(real_dict, tuple(slots))
    key = id(kind)
    _LAYOUTS[key] = (weakref.ref(kind, lambda _, key=key: _LAYOUTS.pop(key, None)), layout)
    return layout


def instance_dict(obj: Any) -> dict | None:
    """The object's real `__dict__`, without running its `__getattr__`/`__getattribute__`.

    A class that defines `__dict__` itself (a property) hides the real one: its getter is user
    code that can raise, lie or hang, so such an object is not read at all.
    """
    if not _layout(type(obj)).real_dict:
        return None
    try:
        attrs = object.__getattribute__(obj, "__dict__")
    except Exception:
        return None
    return attrs if type(attrs) is dict else None


def slot_values(obj: Any) -> Iterator[tuple[str, Any]]:
    """(name, value) for each filled `__slots__` member, read through the member descriptor."""
    for name, descriptor, owner in _layout(type(obj)).slots:
        try:
            yield name, descriptor.__get__(obj, owner)
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
        elif kind is types.MappingProxyType:
            # Its mapping, read through gc (C level): a real dict is walked like one, with
            # steps the user can type on the proxy itself (`proxy['key']`).
            mapping = gc.get_referents(obj)
            if len(mapping) == 1 and issubclass(type(mapping[0]), dict):
                yield from children(mapping[0])
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


def _enqueue(queue: deque, queued: set[int], stats: WalkStats, budget: int, path: str, step: str, child: Any) -> bool:
    """Queue `child` unless seen or queued already; False once the budget is spoken for.

    Each queued object is distinct and unseen, so it costs one visit: when the visits made
    plus those queued reach the budget, the rest of a container (a list of a million objects)
    is not even read, and the walk is marked truncated.
    """
    key = id(child)
    if key in stats.seen or key in queued:
        return True
    if stats.visited + len(queue) >= budget:
        stats.truncated = True
        return False
    queued.add(key)
    queue.append((path + step, child))
    return True


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
    queued: set[int] = set()
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
            if not _enqueue(queue, queued, stats, budget, path, step, child):
                break


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
    queued: set[int] = set()
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
            if not _enqueue(queue, queued, stats, budget, path, step, child):
                break
    return found
