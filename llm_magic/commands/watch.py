"""Watch mode (`%llmwatch on`): after each cell, a line when a model appears or moves, and a
warning when accelerator memory is left held only by copies the user cannot see.

It runs after every cell, so the common case — a cell that touched no model — must cost next to
nothing. What runs when:

- torch not imported: nothing (no tensor or module can exist).
- Every cell, cheap: one pass over the top-level names with a type check each (the verdict per
  type is cached, so an int costs a dict lookup); `.model` is read from the instance dict of
  objects that have one (pipelines). No walk into any object. Per model: its identity (weak
  reference) and where its first parameter is (device, dtype), so `model.to("cuda")` counts.
  Per top-level tensor: its identity. Plus the output history's size and last key, and the
  identity of the last exception.
- Only when memory can have been left behind does the holder scan (holders.scan_holders) run:
  a model or top-level tensor was unbound or rebound and the old object is still alive (so
  something else holds it), a new output holds tensors, or a new exception's frames hold
  tensors. The gc scan for unnamed copies (with its gc.collect(): a dispatched model lives on
  in reference cycles until the next collection, and that is garbage, not a copy) runs only
  when a model was dropped that way: models are what hooks, optimizers and closures keep.
- With the default `stale_device` (accelerators only), the scan is skipped altogether while no
  accelerator is initialised: no accelerator memory can be held then.

A stale copy is reported once: its key (where it is held, what it is, its bytes) is remembered
until a later scan no longer finds it.
"""

from __future__ import annotations

import sys
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from llm_magic.engine.holders import HIDDEN, NAMED, UNNAMED, HolderRow
from llm_magic.engine.tensors import holds_tensors, loaded_torch
from llm_magic.engine.walk import ATOMIC_TYPES, OPAQUE_TYPES
from llm_magic.measure.memory import accelerator_in_use, accelerator_present
from llm_magic.names import is_accelerator
from llm_magic.units import format_bytes

MIN_STALE_BYTES = 1 << 20  # smaller stale copies are not worth a warning
PROBE_BUDGET = 2_000  # objects looked at to decide whether a new output or traceback holds tensors
FIX_HIDDEN = "%llmfree --hidden"

# Verdicts on a type, cached: what its instances can be for the watcher.
_NEVER, _TENSOR, _MODULE = 0, 1, 2
_PLAIN = 3  # a real instance dict, read as `value.__dict__` (no user code can run on that read)
_GUARDED = 4  # a real instance dict behind a custom __getattribute__: read past it, slower


# -- what one cell left in the namespace ----------------------------------------------------


def _plain_instance_dict(kind: type) -> bool:
    """Do instances keep attributes in a real `__dict__` (read with no user code)?

    The rule of walk.instance_dict, decided once per type instead of once per object.
    """
    import types

    for cls in kind.__mro__:
        descriptor = type.__dict__["__dict__"].__get__(cls).get("__dict__")
        if descriptor is not None:
            return type(descriptor) in (types.GetSetDescriptorType, types.MemberDescriptorType)
    return False


def _verdict(kind: type, torch: Any) -> int:
    if issubclass(kind, torch.Tensor):
        return _TENSOR
    if issubclass(kind, torch.nn.Module):
        return _MODULE
    if kind in ATOMIC_TYPES or issubclass(kind, OPAQUE_TYPES) or not _plain_instance_dict(kind):
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


def _is_shell_name(shell, name: Any, value: Any) -> bool:
    from llm_magic.ipython.shell_state import is_shell_name

    if type(name) is not str or is_shell_name(name):
        return True
    hidden = shell.user_ns_hidden
    return name in hidden and hidden[name] is value


def scan_bindings(shell, torch: Any, verdicts: TypeVerdicts) -> tuple[dict[str, Any], Bindings]:
    """({label: model} now, the same as weak Bindings): one pass, type checks only."""
    try:
        models, tensors = _bound_models_and_tensors(shell, dict.items(shell.user_ns), torch, verdicts)
    except RuntimeError:  # a finalizer changed the namespace while we read it: read a copy
        models, tensors = _bound_models_and_tensors(shell, list(dict.items(shell.user_ns)), torch, verdicts)
    bindings = Bindings(
        models={label: weakref.ref(model) for label, model in models.items()},
        fingerprints={id(model): _fingerprint(model) for model in models.values()},
        tensors={name: weakref.ref(tensor) for name, tensor in tensors.items()},
    )
    return models, bindings


def _bound_models_and_tensors(shell, items, torch: Any, verdicts: TypeVerdicts) -> tuple[dict[str, Any], dict[str, Any]]:
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
            if inner is not None and issubclass(type(inner), module_type) and not _is_shell_name(shell, name, value):
                models[f"{name}.model"] = inner
        elif _is_shell_name(shell, name, value):
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


# -- hidden state: output history and the last exception ------------------------------------


def _output_history(shell) -> dict:
    manager = getattr(shell, "history_manager", None)
    return manager.output_hist if manager is not None else {}


def _output_signature(shell) -> tuple:
    history = _output_history(shell)
    return (len(history), next(reversed(history), None) if history else None)


def new_outputs_hold_tensors(shell, before: tuple) -> bool:
    """Do outputs added since `before` (an _output_signature) hold tensors?"""
    if _output_signature(shell) == before:
        return False
    history = _output_history(shell)
    last_before = before[1]
    for key in reversed(list(history)):
        if last_before is not None and key <= last_before:
            break
        if holds_tensors(history[key], budget=PROBE_BUDGET):
            return True
    return False


def _last_exception(shell, result: Any) -> BaseException | None:
    error = getattr(result, "error_in_exec", None)
    return error if error is not None else getattr(sys, "last_value", None)


def frames_hold_tensors(error: BaseException) -> bool:
    """Do the locals of the exception's frames (the user's and libraries', not IPython's) hold tensors?"""
    from llm_magic.ipython.shell_state import (
        frame_roots,  # one definition of "the frames worth looking at"
    )

    tb = error.__traceback__
    return tb is not None and holds_tensors(dict(frame_roots([tb])), budget=PROBE_BUDGET)


# -- stale copies ---------------------------------------------------------------------------


@dataclass(frozen=True)
class StaleCopy:
    """Memory on a watched device that only a hidden or unnamed reference keeps."""

    path: str  # "Out[7]", "last traceback, frame `f()`, local `x`", "unnamed LlamaForCausalLM at 0x..."
    kind: str  # holders.HIDDEN or holders.UNNAMED
    type_name: str
    bytes_by_device: dict[str, int]  # only the watched devices, bytes no named holder shares

    @property
    def total(self) -> int:
        return sum(self.bytes_by_device.values())

    def to_dict(self) -> dict:
        return {"path": self.path, "kind": self.kind, "type": self.type_name, "bytes_by_device": dict(self.bytes_by_device)}


def stale_copies(rows: tuple[HolderRow, ...], stale_device: Callable[[str], bool], min_bytes: int) -> list[StaleCopy]:
    """Hidden and unnamed holders with at least `min_bytes` on watched devices that no name shares."""
    named = {row.path for row in rows if row.kind == NAMED}
    found = []
    for row in rows:
        if row.kind not in (HIDDEN, UNNAMED):
            continue
        shares_named = any(partner in named for partner in row.shared_with)
        only_here = {
            device: nbytes - (row.shared_by_device.get(device, 0) if shares_named else 0)
            for device, nbytes in row.bytes_by_device.items()
            if stale_device(device)
        }
        only_here = {device: nbytes for device, nbytes in only_here.items() if nbytes > 0}
        if sum(only_here.values()) >= min_bytes:
            found.append(StaleCopy(row.path, row.kind, row.type_name, only_here))
    return found


def _copy_key(copy: StaleCopy, error: BaseException | None) -> tuple:
    """What makes a stale copy the same one as last time: where, what, how big.

    A traceback's paths repeat from one exception to the next, so for those the exception's
    identity is part of the key (it is alive while its traceback holds anything).
    """
    context = id(error) if copy.path.startswith("last ") else None
    return (copy.kind, copy.path, copy.type_name, tuple(sorted(copy.bytes_by_device.items())), context)


def _by_device(bytes_by_device: dict[str, int]) -> str:
    return ", ".join(f"{format_bytes(nbytes)} {device}" for device, nbytes in sorted(bytes_by_device.items()))


def stale_warning(copy: StaleCopy) -> str:
    if copy.kind == HIDDEN:
        return (
            f"⚠ {_by_device(copy.bytes_by_device)} held only by {copy.path} ({copy.type_name}), "
            f"which no name of yours reaches. Free it with {FIX_HIDDEN}"
        )
    return (
        f"⚠ {_by_device(copy.bytes_by_device)} held by {copy.path}, which no name, output or traceback reaches "
        "(and gc.collect() did not free): a closure, a hook or another module keeps it. "
        "Drop that reference, or restart the kernel"
    )


# -- the watcher ----------------------------------------------------------------------------


class Watcher:
    """`%llmwatch on|off`: a `post_run_cell` callback, registered only while watching.

    `stale_device(device)` says which devices' memory is worth a warning when only hidden or
    unnamed copies hold it (default: accelerators). `show` prints a line (default: print).
    """

    def __init__(
        self,
        shell,
        *,
        stale_device: Callable[[str], bool] = is_accelerator,
        min_stale_bytes: int = MIN_STALE_BYTES,
        show: Callable[[str], None] = print,
    ) -> None:
        self.shell = shell
        self.stale_device = stale_device
        self.min_stale_bytes = min_stale_bytes
        self.show = show
        self.scans = 0  # holder scans run: the costly path, counted for tests and benchmarks
        self._verdicts = TypeVerdicts()
        self._bindings = Bindings({}, {}, {})
        self._outputs: tuple = (0, None)
        self._exception: weakref.ref | None = None
        self._warned: set[tuple] = set()
        # One bound method, kept: IPython finds it again by equality to unregister it.
        self._callback = self.post_run_cell

    @property
    def active(self) -> bool:
        return self._callback in self.shell.events.callbacks["post_run_cell"]

    def start(self) -> None:
        """Watch from the next cell on: what is loaded now is the baseline, not news."""
        if self.active:
            return
        self._remember(None)
        self.shell.events.register("post_run_cell", self._callback)

    def stop(self) -> None:
        if self.active:
            self.shell.events.unregister("post_run_cell", self._callback)

    # -- per cell ---------------------------------------------------------------------------

    def post_run_cell(self, result) -> None:
        try:
            self._after_cell(result)
        except Exception as failure:  # noqa: BLE001
            # Raising would make IPython store our traceback as the user's last exception.
            print(f"llm_magic: %llmwatch failed after this cell: {type(failure).__name__}: {failure}", file=sys.stderr)

    def _after_cell(self, result) -> None:
        torch = loaded_torch()
        if torch is None:
            return
        models, bindings = scan_bindings(self.shell, torch, self._verdicts)
        before = self._bindings
        appeared = new_models(models, bindings, before)
        model_dropped = dropped_but_alive(before.models, bindings.models)
        tensor_dropped = dropped_but_alive(before.tensors, bindings.tensors)
        del models
        if appeared:
            from llm_magic.measure.placement import model_placement
            from llm_magic.render.watch import placement_line

            accelerator = accelerator_present(torch)
            for label, model in appeared:
                self.show(placement_line(model_placement(model, label), accelerator))
        del appeared

        error = _last_exception(self.shell, result)
        new_hidden = new_outputs_hold_tensors(self.shell, self._outputs) or self._new_error_holds_tensors(error)
        if (model_dropped or tensor_dropped or new_hidden) and self._may_hold_stale_memory(torch):
            # The gc scan for unnamed copies costs most (it collects garbage first): it runs
            # for dropped models, whose hooks and optimizers are what keeps unnamed copies.
            self._warn_stale(find_orphans=model_dropped, error=error)
        del error
        self._bindings = bindings
        self._remember_hidden_state(result)

    def _new_error_holds_tensors(self, error: BaseException | None) -> bool:
        if error is None or (self._exception is not None and self._exception() is error):
            return False
        return frames_hold_tensors(error)

    def _may_hold_stale_memory(self, torch: Any) -> bool:
        # With the default devices, nothing can be stale before an accelerator is initialised.
        return self.stale_device is not is_accelerator or accelerator_in_use(torch)

    def _warn_stale(self, *, find_orphans: bool, error: BaseException | None) -> None:
        # With find_orphans, scan_holders collects garbage first: a dispatched model that lives
        # on in reference cycles after `del model` is garbage about to go, not a copy.
        copies = self._scan_stale(find_orphans)
        keys = {}
        for copy in copies:
            keys[_copy_key(copy, error)] = copy
        for key, copy in keys.items():
            if key not in self._warned:
                self.show(stale_warning(copy))
        # A copy gone from a later scan may warn again if it comes back. Unnamed copies were
        # not looked for when find_orphans is off: those warned about stay remembered.
        kept = set() if find_orphans else {key for key in self._warned if key[0] == UNNAMED}
        self._warned = set(keys) | kept

    def _scan_stale(self, find_orphans: bool) -> list[StaleCopy]:
        from llm_magic.engine.holders import scan_holders
        from llm_magic.ipython.shell_state import hidden_refs, visible_names

        self.scans += 1
        scan = scan_holders(visible_names(self.shell), hidden_refs(self.shell), find_orphans=find_orphans)
        return stale_copies(scan.rows, self.stale_device, self.min_stale_bytes)

    # -- state between cells ---------------------------------------------------------------

    def _remember(self, result) -> None:
        torch = loaded_torch()
        if torch is not None:
            self._bindings = scan_bindings(self.shell, torch, self._verdicts)[1]
        self._remember_hidden_state(result)

    def _remember_hidden_state(self, result) -> None:
        self._outputs = _output_signature(self.shell)
        error = _last_exception(self.shell, result)
        try:
            self._exception = weakref.ref(error) if error is not None else None
        except TypeError:
            self._exception = None
