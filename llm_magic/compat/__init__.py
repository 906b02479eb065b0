"""Every private API of transformers and accelerate the package touches, one module per library.

`compat.transformers` and `compat.accelerate` are the only modules that name a private symbol
of those libraries (a leading-underscore function, a helper whose signature is not promised, an
internal attribute). The major-version differences are decided there, once. Any failure of
such an access (a symbol moved, a signature changed, a helper that raises on an input it did
not expect) raises `CompatError` with a short reason; callers turn it into an "unknown" figure
with a note, never an exception out of a magic. (IPython's private state is read by
`llm_magic.ipython.shell_state`, the one adapter to the shell.)

`private_symbols()` lists the module-level symbols and class attributes both modules reach by
name, for the installed versions; a test removes each in turn and proves `%%llmload` still
releases, loads and reports.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable


class CompatError(Exception):
    """A private API of transformers or accelerate is missing or behaves differently than expected."""


@dataclass(frozen=True)
class Symbol:
    """One private name: `module` imported, then `qualname` read (dotted: a class attribute)."""

    library: str  # "transformers" | "accelerate"
    module: str  # "transformers.models.auto.auto_factory"
    qualname: str  # "_BaseAutoModelClass" or "PreTrainedModel.get_init_context"
    used_for: str  # what the package needs it for

    @property
    def path(self) -> str:
        return f"{self.module}.{self.qualname}"


def private_symbols() -> tuple[Symbol, ...]:
    """The private symbols the package reaches, for the installed transformers and accelerate."""
    from llm_magic.compat import accelerate, transformers

    return transformers.private_symbols() + accelerate.private_symbols()


def resolve(symbol: Symbol):
    """The object `symbol` names, or CompatError saying which name is missing."""
    import importlib

    try:
        obj = importlib.import_module(symbol.module)
    except Exception as error:  # noqa: BLE001 - a module that moved or fails to import
        raise CompatError(f"{symbol.module} cannot be imported ({type(error).__name__}: {error})") from None
    for part in symbol.qualname.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise CompatError(f"{symbol.path} is missing in this {symbol.library} version") from None
    return obj


def call(symbol: Symbol, *, optional: tuple[str, ...] = (), **kwargs: Any) -> Any:
    """Call the private function `symbol` by keyword; CompatError if it is missing or its
    parameters no longer fit. `optional` keywords are dropped where the function lacks them."""
    return call_function(resolve(symbol), symbol.path, optional=optional, **kwargs)


def call_function(function: Callable, label: str, *, optional: tuple[str, ...] = (), **kwargs: Any) -> Any:
    """`function(**kwargs)`, refusing (CompatError) keywords that no longer bind, rather than a
    call that binds wrongly. Errors raised inside the function pass through."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):  # a builtin without a signature: call as is
        return function(**kwargs)
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()):
        kwargs = {k: v for k, v in kwargs.items() if k in signature.parameters or k not in optional}
    try:
        signature.bind(**kwargs)
    except TypeError as error:
        raise CompatError(f"{label} has another signature in this version ({error})") from None
    return function(**kwargs)


def class_method(symbol: Symbol, owner: Any):
    """`owner`'s own binding of the method `symbol` names on a base class (a subclass or an
    instance may override it); CompatError when the base or `owner` lacks it."""
    resolve(symbol)  # missing on the base class itself: CompatError naming it
    name = symbol.qualname.rsplit(".", 1)[1]
    method = getattr(owner, name, None)
    if method is None:
        raise CompatError(f"{getattr(owner, '__name__', type(owner).__name__)} has no {name} in this "
                          f"{symbol.library} version")
    return method
