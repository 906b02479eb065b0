"""Where an IPython shell keeps references the user cannot see, as release.HiddenRef objects.

This is the one module that knows IPython's internals (checked on IPython 8.39 and 9.18):
- output history: `Out[n]` (= `_oh`, `history_manager.output_hist`), `_n`, and `_`, `__`,
  `___` — each in `user_ns`, in `user_ns_hidden`, and as attributes of the displayhook;
- `last_execution_result.result` (the previous cell's value);
- the last exception: `sys.last_type/last_value/last_traceback/last_exc`,
  `InteractiveTB.tb`, `last_execution_result.error_in_exec`, and through them every frame of
  the traceback with its locals.
"""

from __future__ import annotations

import os
import re
import sys
import traceback
import types
from itertools import chain
from typing import Any, Iterable, Iterator

from llm_magic.engine.exceptions import exception_chain
from llm_magic.engine.release import HiddenRef

_OUTPUT_NAME = re.compile(r"_\d+|_{1,3}")
_INPUT_NAME = re.compile(r"_i{1,3}|_i\d+")
_SHELL_NAMES = frozenset({"In", "Out", "_ih", "_oh", "_dh", "exit", "quit", "get_ipython"})
_EXCEPTION_ATTRS = ("last_type", "last_value", "last_traceback", "last_exc")


class NotInIPython(RuntimeError):
    """A magic's function was called without an IPython shell."""


def require_shell(shell) -> None:
    """A clear error, instead of an AttributeError deep inside, when there is no shell."""
    if shell is None or not hasattr(shell, "user_ns"):
        raise NotInIPython(
            "llm_magic needs an IPython shell: run `%load_ext llm_magic` in IPython, Jupyter or Colab "
            f"(got {type(shell).__name__})"
        )


def is_shell_name(name: str) -> bool:
    """Names IPython itself binds in the user namespace (history, output cache)."""
    if name in _SHELL_NAMES:
        return True
    # Output and input history names all start with "_": the regexes only for those (a
    # namespace of 10,000 names is read at every `%gpustate`).
    return name[:1] == "_" and bool(_OUTPUT_NAME.fullmatch(name) or _INPUT_NAME.fullmatch(name))


def visible_names(shell) -> Iterator[tuple[str, Any]]:
    """The user's own names: `user_ns` less IPython's hidden variables and history names."""
    hidden = shell.user_ns_hidden
    for name, value in list(dict.items(shell.user_ns)):
        if type(name) is not str or is_shell_name(name):
            continue
        if name in hidden and hidden[name] is value:
            continue
        yield name, value


# -- output history -------------------------------------------------------------------------


def _output_refs(shell) -> Iterator[HiddenRef]:
    output_hist = shell.history_manager.output_hist if shell.history_manager else {}
    for number in list(output_hist):
        yield HiddenRef(
            f"Out[{number}]",
            roots=lambda n=number: [(f"Out[{n}]", output_hist[n])] if n in output_hist else [],
            clear=lambda n=number: output_hist.pop(n, None),
        )
    namespaces = (shell.user_ns, shell.user_ns_hidden)
    # `_N` exists for each output N the displayhook stored: read them from the output
    # history's keys rather than scanning a namespace of thousands of names.
    for number in sorted(output_hist):
        name = f"_{number}"
        yield HiddenRef(
            name,
            roots=lambda name=name: [(name, ns[name]) for ns in namespaces if name in ns],
            clear=lambda name=name: [ns.pop(name, None) for ns in namespaces],
        )
    for name in ("_", "__", "___"):
        yield HiddenRef(name, roots=lambda name=name: _underscore_values(shell, name), clear=lambda name=name: _clear_underscore(shell, name))


def _underscore_values(shell, name: str) -> list[tuple[str, Any]]:
    values = [(name, ns[name]) for ns in (shell.user_ns, shell.user_ns_hidden) if name in ns]
    displayhook = getattr(shell, "displayhook", None)
    if displayhook is not None and name in vars(displayhook):
        values.append((name, vars(displayhook)[name]))
    return values


def _clear_underscore(shell, name: str) -> None:
    # '' is what IPython itself puts there when the output cache is flushed.
    for ns in (shell.user_ns, shell.user_ns_hidden):
        if name in ns:
            ns[name] = ""
    displayhook = getattr(shell, "displayhook", None)
    if displayhook is not None and name in vars(displayhook):
        setattr(displayhook, name, "")


def _last_result_ref(shell) -> Iterator[HiddenRef]:
    def roots():
        result = getattr(shell, "last_execution_result", None)
        return [("the last cell's result", result.result)] if result is not None else []

    def clear():
        result = getattr(shell, "last_execution_result", None)
        if result is not None:
            result.result = None

    # Labelled as the user would say it, like "last traceback": IPython keeps the previous
    # cell's value in `shell.last_execution_result.result`.
    yield HiddenRef("last result", roots=roots, clear=clear)


# -- the last exception ---------------------------------------------------------------------


def _exceptions(shell) -> list[BaseException]:
    """The last exception(s) the shell or sys keep, with their causes and contexts."""
    candidates = [getattr(sys, "last_value", None), getattr(sys, "last_exc", None)]
    result = getattr(shell, "last_execution_result", None)
    if result is not None:
        candidates += [result.error_in_exec, result.error_before_exec]
    return exception_chain(*candidates)


def _tracebacks(shell) -> list[types.TracebackType]:
    tbs = [exc.__traceback__ for exc in _exceptions(shell)]
    return _distinct(tbs + [getattr(sys, "last_traceback", None), _interactive_tb(shell)])


def _interactive_tb(shell) -> types.TracebackType | None:
    return getattr(getattr(shell, "InteractiveTB", None), "tb", None)


def _distinct(tbs) -> list[types.TracebackType]:
    """The tracebacks among `tbs`, each once, in order."""
    unique: list[types.TracebackType] = []
    for tb in tbs:
        if isinstance(tb, types.TracebackType) and all(tb is not seen for seen in unique):
            unique.append(tb)
    return unique


def frames_of(tb: types.TracebackType | None) -> Iterator[types.FrameType]:
    while tb is not None:
        yield tb.tb_frame
        tb = tb.tb_next


def _machinery_folders() -> tuple[str, ...]:
    """Folders of code whose frames hold the machinery, not the user's data.

    IPython's `run_code` frame has the shell itself as `self`: walking it would claim the
    whole namespace and the output history as held by the traceback.
    """
    files = (__file__, getattr(sys.modules.get("IPython"), "__file__", None))
    return tuple(os.path.dirname(os.path.abspath(path)) + os.sep for path in files if path)


def frame_roots(tracebacks: Iterable[types.TracebackType], prefix: str = "") -> list[tuple[str, Any]]:
    """(label, value) for the locals of the user's and libraries' frames in the tracebacks."""
    roots: list[tuple[str, Any]] = []
    seen: set[int] = set()
    machinery = _machinery_folders()
    for tb in tracebacks:
        for frame in frames_of(tb):
            if id(frame) in seen or frame.f_code.co_filename.startswith(machinery):
                continue
            seen.add(id(frame))
            f_locals = frame.f_locals
            if f_locals is frame.f_globals:
                continue  # a cell's module-level frame: its "locals" are the user namespace
            where = f"{prefix}frame `{frame.f_code.co_name}()`"
            roots += [(f"{where}, local `{name}`", value) for name, value in f_locals.items()]
    return roots


def _exception_roots(shell) -> list[tuple[str, Any]]:
    roots = frame_roots(_tracebacks(shell), prefix="last traceback, ")
    for exc in _exceptions(shell):
        roots += [(f"last exception {type(exc).__name__}.args[{i}]", arg) for i, arg in enumerate(exc.args)]
    return roots


def clear_traceback_frames(tracebacks: Iterable[types.TracebackType]) -> int:
    """Drop the locals of every finished frame in the tracebacks; the number of frames seen.

    The exceptions themselves stay (the OOM rescue keeps the user's error for `%debug`).
    """
    count = 0
    for tb in tracebacks:
        traceback.clear_frames(tb)  # skips (and leaves alone) a frame still executing
        for frame in frames_of(tb):
            count += 1
            # Python 3.11 keeps a snapshot dict of the locals made by an earlier f_locals
            # read (IPython's traceback rendering); reading again after clear() empties it.
            frame.f_locals  # noqa: B018
    return count


def clear_exception_state(shell) -> None:
    """Drop the last exception everywhere IPython and sys keep it, and free its frames."""
    clear_traceback_frames(_tracebacks(shell))
    for name in _EXCEPTION_ATTRS:
        if hasattr(sys, name):
            delattr(sys, name)
    interactive_tb = getattr(shell, "InteractiveTB", None)
    if interactive_tb is not None and getattr(interactive_tb, "tb", None) is not None:
        interactive_tb.tb = None
    result = getattr(shell, "last_execution_result", None)
    if result is not None:
        result.error_in_exec = None
        result.error_before_exec = None


def _exception_ref(shell) -> Iterator[HiddenRef]:
    yield HiddenRef("last traceback", roots=lambda: _exception_roots(shell), clear=lambda: clear_exception_state(shell))


def hidden_refs(shell) -> list[HiddenRef]:
    """Every place in the shell that can keep an object alive behind the user's back."""
    return list(chain(_output_refs(shell), _last_result_ref(shell), _exception_ref(shell)))


def naming_roots(shell) -> Iterable[tuple[str, Any]]:
    """Roots to name holders from: the user's names first (shortest, most familiar paths)."""
    yield from visible_names(shell)
    for ref in hidden_refs(shell):
        try:
            yield from ref.roots()
        except Exception:
            continue


# -- what changed after a cell (watch mode) ---------------------------------------------------


def is_user_binding(shell, name: Any, value: Any) -> bool:
    """Is `name` (bound to `value` in user_ns) one of the user's own, not IPython's?"""
    if type(name) is not str or is_shell_name(name):
        return False
    hidden = shell.user_ns_hidden
    return not (name in hidden and hidden[name] is value)


def output_history(shell) -> dict:
    """`Out`: output number -> value (empty when the shell keeps no history)."""
    manager = getattr(shell, "history_manager", None)
    return manager.output_hist if manager is not None else {}


def output_signature(shell) -> tuple:
    """(count, last number) of the output history: different after a cell that added outputs."""
    history = output_history(shell)
    return (len(history), next(reversed(history), None) if history else None)


def outputs_since(shell, signature: tuple) -> list[Any]:
    """The values of outputs added since `signature` (newest first)."""
    if output_signature(shell) == signature:
        return []
    history = output_history(shell)
    last_before = signature[1]
    found = []
    for key in reversed(list(history)):
        if last_before is not None and key <= last_before:
            break
        found.append(history[key])
    return found


def last_exception(result: Any = None) -> BaseException | None:
    """The exception of the cell that just ran (`result`), else the one sys keeps."""
    error = getattr(result, "error_in_exec", None)
    return error if error is not None else getattr(sys, "last_value", None)


def failing_tracebacks(shell, error: BaseException) -> list[types.TracebackType]:
    """The tracebacks of the cell that failed with `error`: its exception chain's, and the same
    traceback where sys and IPython keep it (only when they keep this very error)."""
    chain = exception_chain(error)
    found = [exc.__traceback__ for exc in chain]
    if any(getattr(sys, "last_value", None) is exc for exc in chain):
        found.append(getattr(sys, "last_traceback", None))
    return _distinct(found + [_interactive_tb(shell)])
