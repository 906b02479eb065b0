"""Exceptions and their tracebacks: the chain of causes, and tracebacks as the user needs them.

A body that fails is re-raised by the magic with its own frames (the orchestration in
llm_magic) cut off the front, so the traceback starts at the user's code. A load that fails
inside transformers is shortened further, to the user's frames and the frame that raised:
ninety lines of hub and loader internals bury the one line that says what went wrong.
"""

from __future__ import annotations

import os
import sysconfig
import types
from functools import lru_cache

_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep  # all of llm_magic


def without_own_frames(error: BaseException) -> BaseException:
    """Start the traceback at the user's code: our orchestration frames are noise to them."""
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None and tb.tb_frame.f_code.co_filename.startswith(_PACKAGE):
        tb = tb.tb_next
    return error.with_traceback(tb)


@lru_cache(maxsize=1)
def _library_folders() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    folders = {paths[key] for key in ("stdlib", "platstdlib", "purelib", "platlib") if key in paths}
    return tuple(os.path.join(os.path.abspath(folder), "") for folder in folders) + (_PACKAGE,)


def user_frames_and_raiser(error: BaseException) -> BaseException:
    """Keep the frames of the user's code, and the innermost frame (where it was raised)."""
    entries = []
    tb = error.__traceback__
    while tb is not None:
        entries.append(tb)
        tb = tb.tb_next
    if len(entries) < 3:
        return error
    libraries = _library_folders()
    kept = [entry for entry in entries[:-1] if not entry.tb_frame.f_code.co_filename.startswith(libraries)]
    kept.append(entries[-1])
    rebuilt = None
    for entry in reversed(kept):
        rebuilt = types.TracebackType(rebuilt, entry.tb_frame, entry.tb_lasti, entry.tb_lineno)
    return error.with_traceback(rebuilt)


def exception_chain(*errors: BaseException | None) -> list[BaseException]:
    """The errors, then their causes and contexts (an OOM re-raised as another error counts),
    each once; what is not an exception (None) is skipped."""
    chain: list[BaseException] = []
    pending = list(errors)
    while pending:
        exc = pending.pop(0)
        if isinstance(exc, BaseException) and all(exc is not seen for seen in chain):
            chain.append(exc)
            pending += [exc.__cause__, exc.__context__]
    return chain
