"""Every cell hook (ipython/hooks.py) registers one callback however often it is turned on, and
turning it off restores IPython's callback lists exactly: what `%unload_ext` relies on."""

from __future__ import annotations

import pytest

from llm_magic.ipython.hooks import Guard, OOMRescue, Watcher

EVENTS = ("pre_run_cell", "post_run_cell")

# name -> (make the hook, its "on" method, its "off" method, callbacks it adds per event)
HOOKS = {
    "oom-rescue": (lambda shell: OOMRescue(shell), "register", "unregister", (0, 1)),
    "watch": (lambda shell: Watcher(shell, show=lambda line: None), "start", "stop", (0, 1)),
    "guard": (lambda shell: Guard(shell, lambda: True, lambda: False), "register", "unregister", (1, 1)),
}


@pytest.mark.parametrize("name", HOOKS)
def test_on_twice_adds_one_callback_and_off_twice_restores_the_lists(shell, name):
    make, on, off, adds = HOOKS[name]

    def earlier(info=None):
        pass

    for event in EVENTS:
        shell.events.register(event, earlier)
    before = {event: list(shell.events.callbacks[event]) for event in EVENTS}
    hook = make(shell)
    getattr(hook, on)()
    getattr(hook, on)()  # twice: still one callback per event
    assert tuple(len(shell.events.callbacks[e]) - len(before[e]) for e in EVENTS) == adds
    getattr(hook, off)()
    getattr(hook, off)()  # twice: no error
    assert {event: list(shell.events.callbacks[event]) for event in EVENTS} == before
    assert all(shell.events.callbacks[event][-1] is earlier for event in EVENTS)
