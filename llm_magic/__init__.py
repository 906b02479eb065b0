"""llm_magic: reload LLMs in notebooks without stale copies, and see where memory is.

`%load_ext llm_magic` registers the magics. Nothing heavy is imported here: torch and
transformers load only when a magic needs them.
"""

from __future__ import annotations

__version__ = "0.1.0"

# The instance registered per shell, so unload removes exactly what load added.
_ATTR = "_llm_magic_instance"


def load_ipython_extension(shell) -> None:
    from .magics import LLMMagic

    if getattr(shell, _ATTR, None) is not None:
        return
    magics = LLMMagic(shell=shell)
    shell.register_magics(magics)  # also makes it a configurable: `%config LLMMagic.x = ...`
    magics.oom.register()
    setattr(shell, _ATTR, magics)


def unload_ipython_extension(shell) -> None:
    magics = getattr(shell, _ATTR, None)
    if magics is None:
        return
    magics.watcher.stop()
    magics.oom.unregister()
    for kind, names in magics.magics.items():
        for name in names:
            shell.magics_manager.magics[kind].pop(name, None)
    shell.magics_manager.registry.pop(type(magics).__name__, None)
    shell.configurables[:] = [c for c in shell.configurables if c is not magics]
    delattr(shell, _ATTR)
