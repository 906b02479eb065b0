"""llm_magic: reload LLMs in notebooks without stale copies, and see where memory is.

`%load_ext llm_magic` registers the magics. Nothing heavy is imported here: torch and
transformers load only when a magic needs them. The layers, from the user inwards:
`ipython/` (the extension, the magics, the one adapter to IPython's state), `commands/` (what each
magic does, as plain functions returning data), `render/` (text and HTML), and the logic they
share: `engine/` (walking objects, releasing them), `measure/` (memory, placement, KV cache),
`predict/` (what a load will do before it runs), `cell/` (reading a cell's code) and `compat/`
(every private API of the libraries we rely on).
"""

from __future__ import annotations

__version__ = "0.1.0"


def load_ipython_extension(shell) -> None:
    from llm_magic.ipython.extension import load

    load(shell)


def unload_ipython_extension(shell) -> None:
    from llm_magic.ipython.extension import unload

    unload(shell)
