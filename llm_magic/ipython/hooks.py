"""The callbacks llm_magic hangs on IPython's cell events, on one base.

- `OOMRescue` (post_run_cell, on by default): after a cell dies of a device out-of-memory
  error, free what its traceback's frames hold and explain (commands/oom.py);
- `Watcher` (post_run_cell, `%llmwatch on`): placement lines and stale-copy warnings
  (commands/watch.py);
- `Guard` (pre_run_cell and post_run_cell, on by default): release before a plain cell that
  loads a model, placement after it (commands/guard.py).
Each computes with a command function and shows what render/ makes of its result.

Each hook registers one bound method, kept, so IPython finds the very same callback again to
unregister it (`%unload_ext` restores the callback lists exactly). A hook never lets an
exception out: IPython would print *our* traceback and, after a cell, store it as the user's
last exception, hiding theirs from `%debug`. A failure is one line on stderr instead.
"""

from __future__ import annotations

import sys
from typing import Any, Callable


class CellHook:
    """Subclasses set `event` ("pre_run_cell" or "post_run_cell"), `label` and `handle`."""

    event = "post_run_cell"
    label = "llm_magic"

    def __init__(self, shell) -> None:
        self.shell = shell
        # One bound method, kept: IPython unregisters by equality with what was registered.
        self._callback = self._on_event

    @property
    def registered(self) -> bool:
        return self._callback in self.shell.events.callbacks[self.event]

    def register(self) -> None:
        if not self.registered:
            self.shell.events.register(self.event, self._callback)

    def unregister(self) -> None:
        if self.registered:
            self.shell.events.unregister(self.event, self._callback)

    def _on_event(self, info) -> None:
        try:
            self.handle(info)
        except Exception as failure:  # noqa: BLE001 - see the module docstring
            print(f"llm_magic: {self.label} failed: {type(failure).__name__}: {failure}", file=sys.stderr)

    def handle(self, info) -> None:
        raise NotImplementedError


class OOMRescue(CellHook):
    """After a cell failed with a device out-of-memory error: rescue, and explain below it.

    `enabled` is asked after every failed cell (the `LLMMagic.oom_rescue` setting), so turning
    it off needs no re-registration. `show` displays the renderable (default: render.show).
    """

    event = "post_run_cell"
    label = "the out-of-memory rescue"

    def __init__(self, shell, enabled: Callable[[], bool] = lambda: True, *, show: Callable[[Any], None] | None = None) -> None:
        super().__init__(shell)
        self.enabled = enabled
        self._show = show
        self.last_explanation = None  # commands.oom.OOMExplanation: plain data, holds no tensor

    def handle(self, result) -> None:
        error = getattr(result, "error_in_exec", None)
        if error is None or not self.enabled():
            return
        from llm_magic.commands.oom_errors import find_oom

        if find_oom(error) is None:
            return
        from llm_magic.commands.oom import rescue
        from llm_magic.render.core import show
        from llm_magic.render.oom import render_oom

        self.last_explanation = rescue(self.shell, error)
        (self._show or show)(render_oom(self.last_explanation))


class Watcher(CellHook):
    """`%llmwatch on|off`: registered only while watching. `show` prints a line."""

    event = "post_run_cell"
    label = "%llmwatch"

    def __init__(self, shell, *, show: Callable[[str], None] = print, **options) -> None:
        from llm_magic.commands.watch import Watch

        super().__init__(shell)
        self.show = show
        self.watch = Watch(shell, **options)

    @property
    def active(self) -> bool:
        return self.registered

    @property
    def scans(self) -> int:
        return self.watch.scans

    def start(self) -> None:
        """Watch from the next cell on: what is loaded now is the baseline, not news."""
        if not self.registered:
            self.watch.remember()
            self.register()

    def stop(self) -> None:
        self.unregister()

    def handle(self, result) -> None:
        from llm_magic.render.watch import watch_line

        for event in self.watch.after_cell(result):
            self.show(watch_line(event))


class GuardBefore(CellHook):
    event = "pre_run_cell"
    label = "guard mode (before the cell)"

    def __init__(self, shell, enabled: Callable[[], bool], after: "GuardAfter") -> None:
        super().__init__(shell)
        self.enabled = enabled
        self.after = after

    def handle(self, info) -> None:
        self.after.plan = None
        raw_cell = getattr(info, "raw_cell", None)
        if not raw_cell or not self.enabled():
            return
        from llm_magic.commands.guard import guard_before_cell
        from llm_magic.render.watch import guard_release_lines

        plan, event = guard_before_cell(self.shell, raw_cell)
        self.after.plan = plan
        if event is not None:
            for line in guard_release_lines(event):
                print(line)
            if event.released is not None and event.released.interrupted:
                # IPython catches what a pre_run_cell callback raises and runs the cell anyway:
                # the interrupt cannot stop it from here, so say so rather than swallow it.
                print("guard: Ctrl-C arrived during the release (which completed); the cell runs now — interrupt it again to stop it")


class GuardAfter(CellHook):
    event = "post_run_cell"
    label = "guard mode (after the cell)"

    def __init__(self, shell, watching: Callable[[], bool]) -> None:
        super().__init__(shell)
        self.watching = watching
        self.plan = None  # set by GuardBefore for a cell that loads models

    def handle(self, result) -> None:
        plan, self.plan = self.plan, None
        if plan is None or self.watching():  # %llmwatch prints the same line itself
            return
        from llm_magic.commands.guard import guard_after_cell
        from llm_magic.measure.memory import accelerator_present
        from llm_magic.render.watch import placement_line

        accelerator = accelerator_present()
        for placement in guard_after_cell(self.shell, plan):
            print(placement_line(placement, accelerator))


class Guard:
    """Both callbacks, registered and unregistered together."""

    def __init__(self, shell, enabled: Callable[[], bool], watching: Callable[[], bool]) -> None:
        self.after = GuardAfter(shell, watching)
        self.before = GuardBefore(shell, enabled, self.after)

    def register(self) -> None:
        self.before.register()
        self.after.register()

    def unregister(self) -> None:
        self.before.unregister()
        self.after.unregister()
