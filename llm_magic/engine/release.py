"""The release engine: drop every reference we are allowed to drop, then prove it worked.

It knows nothing of IPython. Callers describe the world as plain objects:
- `Target`: an object to release, with the bindings that name it (`model` in the namespace);
- `HiddenRef`: a place that may keep a copy alive behind the user's back (`Out[3]`, `_`, the
  last traceback), with the objects it holds and a way to clear it.
The engine clears the target bindings and every hidden reference that reaches a target (and no
other), and checks with weak references that each target is really gone: one full collection
first only if one is not (reference cycles), none when reference counting already freed them.
A survivor is reported with the paths that still hold it (`results[0].model`), never as freed.
"""

from __future__ import annotations

import gc
import signal
import threading
import weakref
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

from llm_magic.engine.naming import name_holders, summarise
from llm_magic.engine.shapes import type_name
from llm_magic.engine.tensors import (
    Footprint,
    find_tensor_holders,
    is_tensor,
    loaded_torch,
    tensors_of,
)
from llm_magic.engine.walk import find_paths, paused_gc


@dataclass(frozen=True)
class Binding:
    """A reference the user asked us to drop: a name, an attribute, an item."""

    label: str
    clear: Callable[[], None]


@dataclass(frozen=True)
class Target:
    label: str
    value: Any
    bindings: tuple[Binding, ...]


@dataclass(frozen=True)
class HiddenRef:
    """A reference the user cannot see in their namespace: output history, traceback, ..."""

    label: str
    roots: Callable[[], Iterable[tuple[str, Any]]]  # (path, object) it holds
    clear: Callable[[], None]


@dataclass(frozen=True)
class ReleasedObject:
    label: str
    type_name: str
    bytes_by_device: dict[str, int]
    cleared: tuple[str, ...]  # every reference we dropped for it
    freed: bool  # proven by weak references after gc (always False in a dry run)
    held_by: tuple[str, ...] = ()  # when not freed: paths that still hold it


@dataclass(frozen=True)
class ReleaseResult:
    released: tuple[ReleasedObject, ...] = ()
    freed_bytes: dict[str, int] = field(default_factory=dict)  # per device, proven freed
    interrupted: bool = False  # a KeyboardInterrupt arrived and was deferred past the release
    also_cleared: tuple[str, ...] = ()  # hidden copies dropped of objects the user still names
    dry_run: bool = False  # nothing was changed: this is what a release would do
    cut: tuple[str, ...] = ()  # names searched for tensors only in part (too many objects)

    @property
    def all_freed(self) -> bool:
        return all(item.freed for item in self.released)

    def to_dict(self) -> dict:
        return asdict(self)


@contextmanager
def deferred_interrupt() -> Iterator[list]:
    """Hold Ctrl-C until the block ends, so references are dropped all or nothing.

    Yields a list that gets an entry if an interrupt arrived; the caller re-raises it.
    """
    received: list = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = signal.getsignal(signal.SIGINT)
    try:
        signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    except (ValueError, TypeError):  # not installable here: run unprotected
        yield received
        return
    try:
        yield received
    finally:
        signal.signal(signal.SIGINT, previous)


def return_memory(devices: Iterable[str]) -> None:
    """Give freed memory back: PyTorch's cached CUDA blocks (whenever CUDA is already in use:
    cheap, and frames cleared beside the targets may have freed some), and glibc's free lists,
    which otherwise keep a released CPU model's pages in the process, so that the next
    `device_map="auto"` still sees them as used and offloads. The C heap only when cpu memory
    was freed (`devices`): trimming costs ~90 ms in a big process and frees nothing for a
    model that was on the GPU."""
    torch = loaded_torch()
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    if "cpu" in set(devices):
        _trim_c_heap()


def _trim_c_heap() -> None:
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # musl or another libc: nothing to trim
        pass


@dataclass
class _Plan:
    """One target, read before anything is dropped: what it holds, and how to see it go."""

    label: str
    type_name: str
    footprint: Footprint
    probes: list[weakref.ref]
    bindings: tuple[Binding, ...]
    hidden_labels: tuple[str, ...]  # hidden references that reach it


def _plan(target: Target, hidden_labels: tuple[str, ...]) -> _Plan:
    """The target's footprint and its weak-reference probes, from one walk.

    The probes all die only when the value's memory can go: the value itself when it supports
    weak references, and every tensor inside it (a module can die while an optimizer still
    holds its parameters, and then nothing was freed).
    """
    value = target.value
    footprint, probes = Footprint(), []
    try:
        probes.append(weakref.ref(value))
    except TypeError:
        pass  # lists, dicts, tuples: their tensors speak for them
    for _, leaf in find_tensor_holders([("", value)]):
        footprint.add(leaf)
        for tensor in tensors_of(leaf):
            try:
                probes.append(weakref.ref(tensor))
            except TypeError:
                continue
    return _Plan(target.label, type_name(value, qualified=True), footprint, probes, target.bindings, hidden_labels)


def _survivors(plans: Sequence[_Plan]) -> list[list[Any]]:
    return [[obj for obj in (probe() for probe in plan.probes) if obj is not None] for plan in plans]


def _reaching(hidden: Sequence[HiddenRef], wanted: set[int]) -> list[tuple[HiddenRef, set[int]]]:
    """The hidden references through which wanted objects are reachable, with their ids."""
    reaching = []
    for ref in hidden:
        try:
            roots = list(ref.roots())
        except Exception:
            continue
        found = find_paths(roots, wanted, stop=is_tensor)
        if found:
            reaching.append((ref, set(found)))
    return reaching


def release(
    targets: list[Target],
    hidden: Sequence[HiddenRef],
    naming_roots: Callable[[], Iterable[tuple[str, Any]]],
    *,
    also_clear: Sequence[HiddenRef] = (),
    dry_run: bool = False,
) -> ReleaseResult:
    """Release `targets` and the hidden references that reach them; verify with weakrefs.

    The engine empties `targets`, so that the caller keeps no strong reference to a value.
    `also_clear` are hidden references to drop as well although they reach no target (copies
    of objects the user still names: dropping them frees nothing by itself).
    `naming_roots` is called only if something survives, to say who still holds it. A
    KeyboardInterrupt during the clearing is held until every reference is dropped and then
    reported as `interrupted` (the caller re-raises it after showing what was released).
    """
    with paused_gc():
        return _release(targets, hidden, naming_roots, also_clear, dry_run)


def _release(targets, hidden, naming_roots, also_clear, dry_run) -> ReleaseResult:
    reaching = _reaching(hidden, {id(target.value) for target in targets}) if targets else []
    plans = [_plan(target, tuple(ref.label for ref, ids in reaching if id(target.value) in ids)) for target in targets]
    targets.clear()  # from here on, only weak references to the values
    extra = [ref for ref in also_clear if all(ref is not other for other, _ in reaching)]
    if dry_run:
        released = tuple(
            ReleasedObject(plan.label, plan.type_name, plan.footprint.by_device(), _cleared(plan), False) for plan in plans
        )
        return ReleaseResult(released, {}, also_cleared=tuple(ref.label for ref in extra), dry_run=True)

    # The collection is inside the protected block too: finalizers run there, and a Ctrl-C
    # landing in one must not be swallowed ("Exception ignored in __del__").
    with deferred_interrupt() as interrupted:
        for plan in plans:
            for binding in plan.bindings:
                binding.clear()
        for ref in [ref for ref, _ in reaching] + extra:
            try:
                ref.clear()
            except Exception:  # a hidden place that refuses: the weakref check will say so
                continue
        # Reference counting frees what holds no cycle the moment the last reference goes;
        # the one full collection (a quarter second in a big notebook) only when something
        # the weak references watch is still there: cycles (accelerate's hooks, a model that
        # refers to itself) need it.
        if any(probe() is not None for plan in plans for probe in plan.probes):
            gc.collect()
        survivors = _survivors(plans)
        freed = Footprint()
        for plan, alive in zip(plans, survivors):
            if not alive:
                freed.merge(plan.footprint)
        return_memory(freed.by_device())

    holders = {}
    if any(survivors):
        holders = name_holders([obj for group in survivors for obj in group], naming_roots(), ignore=[survivors, *survivors])
    released = [
        ReleasedObject(
            label=plan.label,
            type_name=plan.type_name,
            bytes_by_device=plan.footprint.by_device(),
            cleared=_cleared(plan),
            freed=not alive,
            held_by=summarise(dict.fromkeys(path for obj in alive for path in holders.get(id(obj), ()))),
        )
        for plan, alive in zip(plans, survivors)
    ]
    del survivors, holders
    return ReleaseResult(
        tuple(released),
        freed.by_device(),
        interrupted=bool(interrupted),
        also_cleared=tuple(ref.label for ref in extra),
    )


def _cleared(plan: _Plan) -> tuple[str, ...]:
    return tuple(binding.label for binding in plan.bindings) + plan.hidden_labels
