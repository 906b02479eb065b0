"""Watch mode (`%llmwatch on`): after each cell, a line when a model appears or moves, and a
warning when accelerator memory is left held only by copies the user cannot see.

It runs after every cell, so the common case — a cell that touched no model — must cost next to
nothing. What runs when:

- torch not imported: nothing (no tensor or module can exist).
- Every cell, cheap: one pass over the top-level names (engine/bindings.py), plus the output
  history's size and last key, and the identity of the last exception.
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

`Watch.after_cell` returns events (`ModelPlaced`, `StaleCopy`); the hook in ipython/hooks.py shows
them with render/watch.py.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable

from llm_magic.engine.bindings import (
    Bindings,
    TypeVerdicts,
    dropped_but_alive,
    new_models,
    scan_bindings,
)
from llm_magic.engine.holders import HIDDEN, NAMED, UNNAMED, HolderRow
from llm_magic.engine.tensors import holds_tensors, loaded_torch
from llm_magic.ipython import shell_state
from llm_magic.measure.memory import accelerator_in_use, accelerator_present
from llm_magic.names import is_accelerator

MIN_STALE_BYTES = 1 << 20  # smaller stale copies are not worth a warning
PROBE_BUDGET = 2_000  # objects looked at to decide whether a new output or traceback holds tensors


@dataclass(frozen=True)
class ModelPlaced:
    """A model appeared under a name (or moved) in the last cell: where it is now."""

    placement: Any  # measure.placement.ModelPlacement
    accelerator_present: bool  # the machine has one: cpu and disk rows are the slow tier


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
        only_here = {device: nbytes for device, nbytes in row.stale_bytes(named).items() if stale_device(device)}
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


class Watch:
    """What watch mode remembers between cells, and what it finds after one.

    `stale_device(device)` says which devices' memory is worth a warning when only hidden or
    unnamed copies hold it (default: accelerators).
    """

    def __init__(self, shell, *, stale_device: Callable[[str], bool] = is_accelerator, min_stale_bytes: int = MIN_STALE_BYTES) -> None:
        self.shell = shell
        self.stale_device = stale_device
        self.min_stale_bytes = min_stale_bytes
        self.scans = 0  # holder scans run: the costly path, counted for tests and benchmarks
        self._verdicts = TypeVerdicts()
        self._bindings = Bindings({}, {}, {})
        self._outputs: tuple = (0, None)
        self._exception: weakref.ref | None = None
        self._warned: set[tuple] = set()

    def remember(self, result=None) -> None:
        """Make the namespace as it is now the baseline: what is loaded now is not news."""
        torch = loaded_torch()
        if torch is not None:
            self._bindings = self._scan(torch)[1]
        self._remember_hidden_state(result)

    def after_cell(self, result) -> list:
        """The events of the cell that just ran (`result`: IPython's ExecutionResult)."""
        torch = loaded_torch()
        if torch is None:
            return []
        models, bindings = self._scan(torch)
        before = self._bindings
        events: list = []
        appeared = new_models(models, bindings, before)
        if appeared:
            from llm_magic.measure.placement import model_placement

            accelerator = accelerator_present(torch)
            events += [ModelPlaced(model_placement(model, label), accelerator) for label, model in appeared]
        model_dropped = dropped_but_alive(before.models, bindings.models)
        tensor_dropped = dropped_but_alive(before.tensors, bindings.tensors)
        del models, appeared

        error = shell_state.last_exception(result)
        new_hidden = self._new_outputs_hold_tensors() or self._new_error_holds_tensors(error)
        if (model_dropped or tensor_dropped or new_hidden) and self._may_hold_stale_memory(torch):
            # The gc scan for unnamed copies costs most (it collects garbage first): it runs
            # for dropped models, whose hooks and optimizers are what keeps unnamed copies.
            events += self._new_stale_copies(find_orphans=model_dropped, error=error)
        del error
        self._bindings = bindings
        self._remember_hidden_state(result)
        return events

    def _scan(self, torch: Any) -> tuple[dict[str, Any], Bindings]:
        return scan_bindings(self.shell.user_ns, torch, self._verdicts, lambda name, value: shell_state.is_user_binding(self.shell, name, value))

    def _new_outputs_hold_tensors(self) -> bool:
        return any(holds_tensors(value, budget=PROBE_BUDGET) for value in shell_state.outputs_since(self.shell, self._outputs))

    def _new_error_holds_tensors(self, error: BaseException | None) -> bool:
        if error is None or (self._exception is not None and self._exception() is error):
            return False
        tb = error.__traceback__  # the user's and libraries' frames, not IPython's
        return tb is not None and holds_tensors(dict(shell_state.frame_roots([tb])), budget=PROBE_BUDGET)

    def _may_hold_stale_memory(self, torch: Any) -> bool:
        # With the default devices, nothing can be stale before an accelerator is initialised.
        return self.stale_device is not is_accelerator or accelerator_in_use(torch)

    def _new_stale_copies(self, *, find_orphans: bool, error: BaseException | None) -> list[StaleCopy]:
        # With find_orphans, scan_holders collects garbage first: a dispatched model that lives
        # on in reference cycles after `del model` is garbage about to go, not a copy.
        from llm_magic.engine.holders import scan_holders

        self.scans += 1
        scan = scan_holders(shell_state.visible_names(self.shell), shell_state.hidden_refs(self.shell), find_orphans=find_orphans)
        keys = {_copy_key(copy, error): copy for copy in stale_copies(scan.rows, self.stale_device, self.min_stale_bytes)}
        new = [copy for key, copy in keys.items() if key not in self._warned]
        # A copy gone from a later scan may warn again if it comes back. Unnamed copies were
        # not looked for when find_orphans is off: those warned about stay remembered.
        kept = set() if find_orphans else {key for key in self._warned if key[0] == UNNAMED}
        self._warned = set(keys) | kept
        return new

    def _remember_hidden_state(self, result) -> None:
        self._outputs = shell_state.output_signature(self.shell)
        error = shell_state.last_exception(result)
        try:
            self._exception = weakref.ref(error) if error is not None else None
        except TypeError:
            self._exception = None
