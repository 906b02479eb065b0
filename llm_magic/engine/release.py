"""The release engine: drop every reference we are allowed to drop, then prove it worked.

It knows nothing of IPython. Callers describe the world as plain objects:
- `Target`: an object to release, with the bindings that name it (`model` in the namespace);
- `HiddenRef`: a place that may keep a copy alive behind the user's back (`Out[3]`, `_`, the
  last traceback), with the objects it holds and a way to clear it.
The engine clears the target bindings and every hidden reference that reaches a target (and no
other), collects garbage, and checks with weak references that each target is really gone. A
survivor is reported with the paths that still hold it (`results[0].model`), never as freed.
"""

from __future__ import annotations

import gc
import signal
import threading
import weakref
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

from llm_magic.engine.tensors import (
    Footprint,
    find_tensor_holders,
    footprint_of,
    is_tensor,
    loaded_torch,
    tensors_of,
)
from llm_magic.engine.walk import WalkStats, find_paths, type_name


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


def collect_garbage() -> None:
    """gc, then give the memory back: PyTorch's cached CUDA blocks (only if CUDA is already in
    use), and glibc's free lists, which otherwise keep a released CPU model's pages in the
    process, so that the next `device_map="auto"` still sees them as used and offloads."""
    gc.collect()
    torch = loaded_torch()
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
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


def _probes(value: Any) -> list[weakref.ref]:
    """Weak references that all die only when `value`'s memory can go.

    The value itself when it supports weak references, and every tensor inside it: a module
    can die while an optimizer still holds its parameters, and then nothing was freed.
    """
    probes = []
    try:
        probes.append(weakref.ref(value))
    except TypeError:
        pass  # lists, dicts, tuples: their tensors speak for them
    for _, leaf in find_tensor_holders([("", value)]):
        for tensor in tensors_of(leaf):
            try:
                probes.append(weakref.ref(tensor))
            except TypeError:
                continue
    return probes


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


def name_holders(
    survivors: Sequence[Any],
    naming_roots: Iterable[tuple[str, Any]],
    *,
    ignore: Iterable[Any] = (),
) -> dict[int, list[str]]:
    """Paths from the user's names (then hidden places) that still reach each survivor.

    Survivors no name reaches are described by the types of their referrers, from one gc scan
    for all of them; `ignore` are the caller's own containers of survivors (not holders).
    """
    wanted = {id(obj) for obj in survivors}
    found = find_paths(naming_roots, wanted, stop=is_tensor, stats=WalkStats())
    unnamed = [obj for obj in survivors if id(obj) not in found]
    if unnamed:
        ours = {id(survivors), id(unnamed), *(id(container) for container in ignore)}
        for key, description in _unnamed_holders(unnamed, ours).items():
            found[key] = [description]
    return found


def _unnamed_holders(objs: list[Any], ours: set[int]) -> dict[int, str]:
    """For objects no name reaches: 'unnamed: ... referenced by <types>' each, one heap scan."""
    import types

    ids = {id(obj) for obj in objs}
    kinds: dict[int, set[str]] = {key: set() for key in ids}
    for referrer in gc.get_referrers(*objs):
        if id(referrer) in ours or type(referrer) is types.FrameType:
            continue  # our own bookkeeping, and the frames of this very call
        for child in gc.get_referents(referrer):
            if id(child) in ids:
                kinds[id(child)].add(type_name(referrer, qualified=True))
    described = {}
    for key, names in kinds.items():
        holders = ", ".join(sorted(names)[:4]) or "a C extension or a frame"
        described[key] = f"unnamed: reachable from no name, referenced by {holders}"
    return described


def _summarise(paths: Iterable[str], shown: int = 3) -> tuple[str, ...]:
    """A few holder paths, then a count: a kept optimizer names hundreds of parameters.

    A path inside one already listed (`results[0].model._modules[...]` under
    `results[0].model`) adds nothing and is left out.
    """
    outer: list[str] = []
    for path in paths:
        if not any(path.startswith(prefix) and path[len(prefix):][:1] in (".", "[") for prefix in outer):
            outer.append(path)
    paths = outer
    if len(paths) <= shown + 1:
        return tuple(paths)
    return tuple(paths[:shown]) + (f"... and {len(paths) - shown} more",)


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
    reaching = _reaching(hidden, {id(target.value) for target in targets}) if targets else []
    plans = [
        (
            target.label,
            type_name(target.value, qualified=True),
            footprint_of(target.value),
            _probes(target.value),
            target.bindings,
            tuple(ref.label for ref, ids in reaching if id(target.value) in ids),
        )
        for target in targets
    ]
    targets.clear()  # from here on, only weak references to the values
    extra = [ref for ref in also_clear if all(ref is not other for other, _ in reaching)]
    if dry_run:
        released = tuple(
            ReleasedObject(label, kind, footprint.by_device(), tuple(b.label for b in bindings) + hidden_labels, False)
            for label, kind, footprint, _, bindings, hidden_labels in plans
        )
        return ReleaseResult(released, {}, also_cleared=tuple(ref.label for ref in extra), dry_run=True)

    # The collection is inside the protected block too: finalizers run there, and a Ctrl-C
    # landing in one must not be swallowed ("Exception ignored in __del__").
    with deferred_interrupt() as interrupted:
        for *_, bindings, _ in plans:
            for binding in bindings:
                binding.clear()
        for ref in [ref for ref, _ in reaching] + extra:
            try:
                ref.clear()
            except Exception:  # a hidden place that refuses: the weakref check will say so
                continue
        collect_garbage()

    survivors = [[obj for obj in (probe() for probe in probes) if obj is not None] for *_, probes, _, _ in plans]
    holders = {}
    if any(survivors):
        holders = name_holders([obj for group in survivors for obj in group], naming_roots(), ignore=[survivors, *survivors])

    released, freed = [], Footprint()
    for (label, kind, footprint, _, bindings, hidden_labels), alive in zip(plans, survivors):
        if not alive:
            freed.merge(footprint)
        released.append(
            ReleasedObject(
                label=label,
                type_name=kind,
                bytes_by_device=footprint.by_device(),
                cleared=tuple(b.label for b in bindings) + hidden_labels,
                freed=not alive,
                held_by=_summarise(dict.fromkeys(path for obj in alive for path in holders.get(id(obj), ()))),
            )
        )
    del survivors, holders
    return ReleaseResult(
        tuple(released),
        freed.by_device(),
        interrupted=bool(interrupted),
        also_cleared=tuple(ref.label for ref in extra),
    )
