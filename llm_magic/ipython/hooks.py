"""One base for the callbacks llm_magic hangs on IPython's cell events.

Each hook registers one bound method, kept, so IPython finds the very same callback again to
unregister it (`%unload_ext` restores the callback lists exactly). A hook never lets an
exception out: IPython would print *our* traceback and, after a cell, store it as the user's
last exception, hiding theirs from `%debug`. A failure is one line on stderr instead.
"""

from __future__ import annotations

import sys


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
