"""`%load_ext llm_magic` and `%unload_ext llm_magic`: each undoes exactly what the other did."""

from __future__ import annotations

# The instance registered per shell, so unload removes exactly what load added.
_ATTR = "_llm_magic_instance"


def load(shell) -> None:
    from llm_magic.ipython.magics import LLMMagic

    if getattr(shell, _ATTR, None) is not None:
        return
    magics = LLMMagic(shell=shell)
    shell.register_magics(magics)  # also makes it a configurable: `%config LLMMagic.x = ...`
    magics.oom.register()
    magics.guard_hooks.register()
    setattr(shell, _ATTR, magics)


def unload(shell) -> None:
    magics = getattr(shell, _ATTR, None)
    if magics is None:
        return
    magics.watcher.stop()
    magics.oom.unregister()
    magics.guard_hooks.unregister()
    for kind, names in magics.magics.items():
        for name in names:
            shell.magics_manager.magics[kind].pop(name, None)
    shell.magics_manager.registry.pop(type(magics).__name__, None)
    shell.configurables[:] = [c for c in shell.configurables if c is not magics]
    delattr(shell, _ATTR)
