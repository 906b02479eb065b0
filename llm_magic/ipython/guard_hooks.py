"""Guard mode's two callbacks: release before a model-loading cell, placement after it."""

from __future__ import annotations

from typing import Callable

from llm_magic.ipython.hooks import CellHook


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
