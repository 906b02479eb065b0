"""How each type's instances are read, decided once per type, and where the user's world ends.

The namespace of a notebook is full of odd objects: proxies, objects whose `__getattr__`,
`__eq__`, `__hash__`, `__len__` or `__bool__` raise or lie, containers of a million items.
Everything here reads object graphs through the C-level slots (`dict.items`, `list.__iter__`,
`object.__getattribute__` for `__dict__`, member descriptors for `__slots__`, a function's
`__defaults__` and closure cells) so that no user-defined Python method runs.

Each type is judged once (its "shape", cached by type): what to read from its instances, or
nothing at all. Nothing is read from the program's machinery: modules, classes, code, frames,
and objects of the packages that run the notebook (IPython, ipykernel, traitlets, zmq, tornado,
asyncio), of `logging` and `threading`. A transformers `Trainer` reaches the kernel's output
stream through a logger's handler, and from there the shell and the whole namespace: a walk
that went on would call every live model "held by" the trainer.
"""

from __future__ import annotations

import functools
import types
import weakref
from dataclasses import dataclass
from typing import Any, Iterator

# Values that can never hold a tensor: skipped without a visit.
ATOMIC_TYPES = frozenset(
    {int, float, complex, str, bytes, bytearray, bool, type(None), range, slice, memoryview}
)

# Objects we never walk into: code and namespaces of the program itself, not user data. A
# module object's globals would pull the whole interpreter into the walk. (Plain functions are
# read, but only for what they hold themselves: defaults, closure cells, attributes.)
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

# Top-level packages whose objects are the machinery running the notebook, not user data: an
# instance of a class with any of these in its MRO is never walked into. The shell, its
# history manager and displayhook are IPython objects; the kernel's streams, sessions and
# sockets are ipykernel / zmq / tornado / asyncio objects; loggers and handlers lead to streams.
BOUNDARY_PACKAGES = frozenset(
    {
        "IPython", "ipykernel", "traitlets", "zmq", "tornado", "asyncio", "_asyncio",
        "jupyter_client", "jupyter_core", "comm", "debugpy", "prompt_toolkit",
        "logging", "threading", "_thread", "concurrent", "selectors", "socket", "_socket",
        "ssl", "_io", "io", "sys", "_frozen_importlib",
        "_frozen_importlib_external", "importlib",
    }
)  # fmt: skip

# What an instance of a type holds, by shape.
ATOM, OPAQUE, DICT, LIST, TUPLE, SET, FROZENSET, MAPPING_PROXY, METHOD, PARTIAL, FUNCTION, CELL, OBJECT = range(13)


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
# A class's own namespace, MRO and module, read past any metaclass (which could define them as
# properties).
_class_dict = type.__dict__["__dict__"].__get__
_class_mro = type.__dict__["__mro__"].__get__
_class_module = type.__dict__["__module__"].__get__


@dataclass(frozen=True)
class Layout:
    """What a type's instances can hold, read once per type from its classes' namespaces."""

    shape: int  # ATOM, OPAQUE, DICT, ... OBJECT
    real_dict: bool  # has a `__dict__` that is CPython's own (not a user property)
    slots: tuple[tuple[str, Any, type], ...]  # (name, member descriptor, owner) per slot


# Per type, so a walk of 200,000 objects does not scan each one's MRO again. Keyed by id with
# a weak reference to check it, not a WeakKeyDictionary: that would compare classes with
# their metaclass's `__eq__`/`__hash__`, which can lie. A class the user deletes (and what its
# attributes hold) is not kept alive by the cache.
_LAYOUTS: dict[int, tuple[weakref.ref, Layout]] = {}


def layout(kind: type) -> Layout:
    entry = _LAYOUTS.get(id(kind))
    if entry is not None and entry[0]() is kind:
        return entry[1]
    mro = _class_mro(kind)
    found = Layout(_shape(kind, mro), *_attributes(mro))
    key = id(kind)
    _LAYOUTS[key] = (weakref.ref(kind, lambda _, key=key: _LAYOUTS.pop(key, None)), found)
    return found


def _in_boundary(mro: tuple) -> bool:
    for cls in mro:
        module = _class_module(cls)
        if type(module) is str and str.partition(module, ".")[0] in BOUNDARY_PACKAGES:
            return True
    return False


def _shape(kind: type, mro: tuple) -> int:
    # Exact types first: their subclasses (a user's list) are judged by the rules below.
    exact = {
        types.FunctionType: FUNCTION,
        types.MethodType: METHOD,
        functools.partial: PARTIAL,
        types.MappingProxyType: MAPPING_PROXY,
        types.CellType: CELL,
    }
    if kind in ATOMIC_TYPES:
        return ATOM
    if kind in exact:
        return exact[kind]
    if issubclass(kind, OPAQUE_TYPES) or _in_boundary(mro):
        return OPAQUE
    for base, shape in ((dict, DICT), (list, LIST), (tuple, TUPLE), (set, SET), (frozenset, FROZENSET)):
        if issubclass(kind, base):
            return shape
    return OBJECT


def _attributes(mro: tuple) -> tuple[bool, tuple]:
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
    return real_dict, tuple(slots)


def instance_dict(obj: Any) -> dict | None:
    """The object's real `__dict__`, without running its `__getattr__`/`__getattribute__`.

    A class that defines `__dict__` itself (a property) hides the real one: its getter is user
    code that can raise, lie or hang, so such an object is not read at all.
    """
    return real_dict(obj) if layout(type(obj)).real_dict else None


def real_dict(obj: Any) -> dict | None:
    try:
        attrs = object.__getattribute__(obj, "__dict__")
    except Exception:
        return None
    return attrs if type(attrs) is dict else None


def slot_values(obj: Any) -> Iterator[tuple[str, Any]]:
    """(name, value) for each filled `__slots__` member, read through the member descriptor."""
    for name, descriptor, owner in layout(type(obj)).slots:
        try:
            yield name, descriptor.__get__(obj, owner)
        except Exception:  # an empty slot raises AttributeError
            continue
