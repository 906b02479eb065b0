"""What an object holds, read without running user code: (path step, child) pairs.

Lists, tuples and dicts through their C-level iterators, instances through their real
`__dict__` and slots, functions through their defaults, closure cells and attributes (never
their globals or code), bound methods through `__self__`, partials through their arguments.
What is read of each type, and what is never read, is decided once per type (shapes.py).
"""

from __future__ import annotations

import gc
import types
from itertools import islice
from typing import Any, Iterator

from llm_magic.engine.paths import closure_note
from llm_magic.engine.shapes import (
    ATOMIC_TYPES,
    CELL,
    DICT,
    FROZENSET,
    FUNCTION,
    LIST,
    MAPPING_PROXY,
    METHOD,
    OBJECT,
    PARTIAL,
    SET,
    TUPLE,
    Layout,
    instance_dict,
    real_dict,
    safe_repr_key,
    slot_values,
)


def expand(obj: Any, found: Layout, limit: int | None) -> tuple[list[tuple[str, Any]], int, bool]:
    """(children, items read, complete) of `obj`: (path step, child) for each non-atomic value.

    At most `limit` items are read (None: all): a list of a million items costs what the walk
    can afford, not a million reads. `complete` is False when items were left unread. Lists,
    tuples and dicts (most of a namespace) take a fast path without a generator.
    """
    shape = found.shape
    try:
        if shape == LIST or shape == TUPLE:
            size = (list.__len__ if shape == LIST else tuple.__len__)(obj)
            values = (list.__iter__ if shape == LIST else tuple.__iter__)(obj)
            read = size if limit is None else min(size, limit)
            if read < size:
                values = islice(values, read)
            return [(f"[{index}]", value) for index, value in enumerate(values) if type(value) not in ATOMIC_TYPES], read, read == size
        if shape == DICT:
            return _dict_children(obj, limit)
        if shape == OBJECT and not found.slots:
            attrs = real_dict(obj) if found.real_dict else None
            return _attribute_children(attrs, limit) if attrs is not None else ([], 0, True)
        return _expand_items(_items(obj, found), limit)
    except Exception:
        # A container mutated under us, or a C extension type that refuses: stop here, the
        # walk goes on with the siblings.
        return [], 0, True


def _dict_children(mapping: dict, limit: int | None) -> tuple[list[tuple[str, Any]], int, bool]:
    # A module's namespace (the notebook's own `user_ns`, a function's globals): the program's
    # state, which the walk never enters.
    if dict.__contains__(mapping, "__builtins__"):
        return [], 0, True
    size = dict.__len__(mapping)
    items = dict.items(mapping) if limit is None or size <= limit else islice(dict.items(mapping), limit)
    children = []
    for key, value in items:
        if type(key) not in ATOMIC_TYPES and type(key) is not tuple:
            children.append((f".keys() item <{type(key).__name__}>", key))
        if type(value) not in ATOMIC_TYPES:
            children.append((safe_repr_key(key), value))
    read = size if limit is None else min(size, limit)
    return children, read, read == size


def _attribute_children(attrs: dict, limit: int | None) -> tuple[list[tuple[str, Any]], int, bool]:
    size = dict.__len__(attrs)
    items = dict.items(attrs) if limit is None or size <= limit else islice(dict.items(attrs), limit)
    children = [
        (f".{name}" if type(name) is str and name.isidentifier() else f".__dict__[{name!r}]", value)
        for name, value in items
        if type(value) not in ATOMIC_TYPES
    ]
    read = size if limit is None else min(size, limit)
    return children, read, read == size


def _expand_items(items: Iterator[tuple[str, Any]], limit: int | None) -> tuple[list[tuple[str, Any]], int, bool]:
    if limit is not None:
        items = islice(items, limit + 1)
    read, found = 0, []
    for step, child in items:
        read += 1
        if limit is not None and read > limit:
            return found, limit, False
        if type(child) not in ATOMIC_TYPES:
            found.append((step, child))
    return found, read, True


def _items(obj: Any, found: Layout) -> Iterator[tuple[str, Any]]:
    """Every (step, value) `obj` holds, atomic values included (they cost a read)."""
    shape = found.shape
    if shape in (SET, FROZENSET):
        for value in set.__iter__(obj) if shape == SET else frozenset.__iter__(obj):
            yield " (a set member)", value
    elif shape == MAPPING_PROXY:
        # Its mapping, read through gc (C level): a real dict is walked like one, with steps
        # the user can type on the proxy itself (`proxy['key']`).
        mapping = gc.get_referents(obj)
        if len(mapping) == 1 and issubclass(type(mapping[0]), dict):
            yield from _dict_children(mapping[0], None)[0]
    elif shape == METHOD:
        yield ".__self__", obj.__self__
    elif shape == PARTIAL:
        yield ".func", obj.func
        for index, value in enumerate(obj.args):
            yield f".args[{index}]", value
        for key, value in obj.keywords.items():
            yield f".keywords[{key!r}]", value
    elif shape == FUNCTION:
        yield from _function_items(obj)
    elif shape == CELL:
        try:
            yield ".cell_contents", obj.cell_contents
        except ValueError:  # an empty cell
            return
    elif shape == OBJECT:
        yield from _attribute_items(obj)


def _function_items(function: types.FunctionType) -> Iterator[tuple[str, Any]]:
    """What a function holds itself: defaults, closure cells, attributes. Never its globals
    (the module's namespace) nor its code."""
    for index, value in enumerate(function.__defaults__ or ()):
        yield f".__defaults__[{index}]", value
    for key, value in (function.__kwdefaults__ or {}).items():
        yield f".__kwdefaults__[{key!r}]", value
    names = function.__code__.co_freevars
    for index, cell in enumerate(function.__closure__ or ()):
        try:
            value = cell.cell_contents
        except ValueError:  # a free variable not bound yet
            continue
        # The free variable's name follows as a note: the path before it is one the user can
        # evaluate, the name is how they know the variable.
        name = closure_note(names[index]) if index < len(names) else ""
        yield f".__closure__[{index}].cell_contents{name}", value
    yield from _attribute_items(function)


def _attribute_items(obj: Any) -> Iterator[tuple[str, Any]]:
    attrs = instance_dict(obj)
    if attrs is not None:
        for name, value in dict.items(attrs):
            step = f".{name}" if type(name) is str and name.isidentifier() else f".__dict__[{name!r}]"
            yield step, value
    for name, value in slot_values(obj):
        yield f".{name}", value
