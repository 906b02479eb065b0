"""The user's top-level models and tensors after a cell, found in one cheap pass.

Watch mode runs after every cell, so the common case (a cell that touched no model) must cost
next to nothing: one pass over the top-level names with a type check each. What a type's
instances can be is decided once per type (shapes.layout, plus whether it is a tensor or a
module), so an int costs a dict lookup; `.model` is read from the instance dict of objects that
have one (pipelines). No walk into any object. Per model: its identity (weak reference) and
where its first parameter is (device, dtype), so `model.to("cuda")` counts as a change.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from llm_magic.engine.shapes import OBJECT, layout

# Verdicts on a type, cached: what its instances can be here.
_NEVER, _TENSOR, _MODULE = 0, 1, 2
_PLAIN = 3  # a real instance dict, read as `value.__dict__` (no user code can run on that read)
_GUARDED = 4  # a real instance dict behind a custom __getattribute__: read past it, slower


def _verdict(kind: type, torch: Any) -> int:
    if issubclass(kind, torch.Tensor):
        return _TENSOR
    if issubclass(kind, torch.nn.Module):
        return _MODULE
    found = layout(kind)  # the walk's own rules: atoms, the boundary, a real __dict__
    if found.shape != OBJECT or not found.real_dict:
        return _NEVER
    # Without a custom __getattribute__, `value.__dict__` is the C-level generic lookup that
    # finds the data descriptor checked above: no user code, and 3x faster than going past it.
    return _PLAIN if kind.__getattribute__ is object.__getattribute__ else _GUARDED


_HEAPTYPE = 1 << 9  # Py_TPFLAGS_HEAPTYPE: a class made at run time, which can die


class TypeVerdicts:
    """Verdicts per type, cached so that a name costs a dict lookup.

    Static types (int, str, list, torch.Tensor) never die: they are keys themselves. Classes
    made at run time (the notebook's own, redefined at will) are keyed by id, and their entry
    goes when they die, so the cache keeps no class (nor what its attributes hold) alive.
    """

    def __init__(self) -> None:
        self.static: dict[type, int] = {}
        self.by_id: dict[int, int] = {}
        self._refs: dict[int, weakref.ref] = {}

    def lookup(self, kind: type, torch: Any) -> int:
        verdict = self.static.get(kind)
        if verdict is None:
            verdict = self.by_id.get(id(kind))
        return verdict if verdict is not None else self._decide(kind, torch)

    def _decide(self, kind: type, torch: Any) -> int:
        verdict = _verdict(kind, torch)
        if not kind.__flags__ & _HEAPTYPE:
            self.static[kind] = verdict
            return verdict
        key = id(kind)

        def forget(_, key=key, by_id=self.by_id, refs=self._refs):
            by_id.pop(key, None)
            refs.pop(key, None)

        try:
            self._refs[key] = weakref.ref(kind, forget)
        except TypeError:
            return verdict  # a class that refuses weak references: decided again next time
        self.by_id[key] = verdict
        return verdict


@dataclass(frozen=True)
class Bindings:
    """The user's top-level models and tensors after a cell (no strong reference kept)."""

    models: dict[str, weakref.ref]  # label ("model", "pipe.model") -> the module
    fingerprints: dict[int, tuple]  # id(module) -> (device, dtype) of its first parameter
    tensors: dict[str, weakref.ref]  # name -> a top-level tensor


def _fingerprint(model: Any) -> tuple:
    """Where the model's first parameter is: changes when the model is moved or cast."""
    try:
        first = next(iter(model.parameters()), None)
    except Exception:
        return ()
    return () if first is None else (str(first.device), str(first.dtype))


def scan_bindings(
    namespace: dict, torch: Any, verdicts: TypeVerdicts, is_users: Callable[[Any, Any], bool]
) -> tuple[dict[str, Any], Bindings]:
    """({label: model} now, the same as weak Bindings): one pass, type checks only.

    `is_users(name, value)` tells the user's own names from the shell's (`Out`, `_3`): asked
    only for the few names whose values are models, tensors or objects with a `.model`.
    """
    try:
        models, tensors = _bound_models_and_tensors(dict.items(namespace), torch, verdicts, is_users)
    except RuntimeError:  # a finalizer changed the namespace while we read it: read a copy
        models, tensors = _bound_models_and_tensors(list(dict.items(namespace)), torch, verdicts, is_users)
    bindings = Bindings(
        models={label: weakref.ref(model) for label, model in models.items()},
        fingerprints={id(model): _fingerprint(model) for model in models.values()},
        tensors={name: weakref.ref(tensor) for name, tensor in tensors.items()},
    )
    return models, bindings


def _bound_models_and_tensors(items, torch: Any, verdicts: TypeVerdicts, is_users) -> tuple[dict[str, Any], dict[str, Any]]:
    # The hot loop of watch mode (10,000 names: ~1 ms). A name that is an int, a string, a
    # list... costs one dict lookup; objects with a __dict__ one more, for their `.model`.
    models: dict[str, Any] = {}
    tensors: dict[str, Any] = {}
    module_type = torch.nn.Module
    # Verdicts keyed by the type itself for this pass only (one lookup per name, and no class
    # is kept alive past it); the persistent cache is asked once per type and pass.
    this_pass: dict[type, int] = {}
    for name, value in items:
        kind = type(value)
        verdict = this_pass.get(kind)
        if verdict is None:
            verdict = this_pass[kind] = verdicts.lookup(kind, torch)
        if verdict == _NEVER:
            continue
        if verdict >= _PLAIN:
            # A pipeline-like object: its `.model`, from the instance dict.
            try:
                attrs = value.__dict__ if verdict == _PLAIN else object.__getattribute__(value, "__dict__")
                inner = attrs.get("model") if type(attrs) is dict else None
            except Exception:
                continue
            if inner is not None and issubclass(type(inner), module_type) and is_users(name, value):
                models[f"{name}.model"] = inner
        elif not is_users(name, value):
            continue
        elif verdict == _MODULE:
            models[name] = value
        else:
            tensors[name] = value
    return models, tensors


def _alive(refs: Iterator[weakref.ref]) -> dict[int, Any]:
    return {id(obj): obj for obj in (ref() for ref in refs) if obj is not None}


def new_models(models: dict[str, Any], now: Bindings, before: Bindings) -> list[tuple[str, Any]]:
    """Models that were not in the namespace after the previous cell, or have moved since."""
    known = _alive(before.models.values())
    found: list[tuple[str, Any]] = []
    for label, model in models.items():
        if any(model is other for _, other in found):
            continue  # `a = b = load()`: one line
        moved = id(model) in known and before.fingerprints.get(id(model)) != now.fingerprints[id(model)]
        if id(model) not in known or moved:
            found.append((label, model))
    return found


def dropped_but_alive(old: dict[str, weakref.ref], new: dict[str, weakref.ref]) -> bool:
    """Was a binding of `old` removed or rebound while something else keeps its object alive?

    If the old object died, its memory came back and nothing can be stale. If it lives,
    something holds it: maybe only the output history, a traceback or an unnamed reference.
    """
    for label, ref in old.items():
        obj = ref()
        if obj is None:
            continue
        replacement = new.get(label)
        if replacement is None or replacement() is not obj:
            return True
    return False
