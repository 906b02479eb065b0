"""What `%%llmload` does, step by step; the magic only parses arguments and shows the report.

1. read the body (syntax checked before anything changes) and the targets it assigns;
2. release the current values of those targets that hold tensors, and every hidden copy;
3. run the body (or the default loader) with MODEL_NAME bound;
4. measure where each model the body bound has landed, and what is still loaded.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import Any, Callable

from . import autoload, cellcode, shellrefs
from .release import Binding, ReleaseResult, Target, release
from .report import Holder, LoadReport
from .tensors import find_tensor_holders, footprint_of, holds_tensors, is_module


@dataclass(frozen=True)
class LoadOptions:
    model_name: str
    model_var: str = "model"
    tokenizer_var: str | None = "tokenizer"
    dtype: str = "auto"
    device_map: str = "auto"
    trust_remote_code: bool = False
    release_all: bool = False
    dry_run: bool = False
    strict: bool = False
    batch: int = 1


@dataclass
class LoadOutcome:
    report: LoadReport
    error: BaseException | None = None  # the body's exception, re-raised by the magic
    value: Any = None  # the body's trailing expression, shown like %%time shows it


class LoadRefused(Exception):
    """A check before the release failed; nothing was changed."""


def _is_empty(source: str) -> bool:
    return not any(line.strip() and not line.strip().startswith("#") for line in source.splitlines())


def plan_body(shell, options: LoadOptions, cell: str | None) -> tuple[list[cellcode.TargetPath], Callable[[], Any]]:
    """(targets the run will assign, a function that runs it). Raises before any change."""
    if cell is None or _is_empty(cell):
        targets = [cellcode.parse_target(options.model_var)]
        if options.tokenizer_var:
            targets.insert(0, cellcode.parse_target(options.tokenizer_var))
        dtype = autoload.parse_dtype(options.dtype)  # a bad dtype fails here, before release
        device_map = autoload.parse_device_map(options.device_map)
        return targets, lambda: _run_default_loader(shell, options, dtype, device_map)
    source = shell.transform_cell(cell)
    tree = cellcode.parse_body(source)
    return cellcode.assignment_targets(tree), lambda: _run_body(shell, source, tree)


def _run_body(shell, source: str, tree: ast.Module) -> Any:
    # Compiled under a name IPython caches, so tracebacks show the body's lines.
    filename = shell.compile.cache(source, shell.execution_count)
    statements, trailing = cellcode.last_expression(tree)
    flags = shell.compile.flags
    exec(compile(statements, filename, "exec", flags=flags, dont_inherit=True), shell.user_global_ns, shell.user_ns)
    if trailing is not None:
        return eval(compile(trailing, filename, "eval", flags=flags, dont_inherit=True), shell.user_global_ns, shell.user_ns)
    return None


def _run_default_loader(shell, options: LoadOptions, dtype: Any, device_map: Any) -> None:
    trust = options.trust_remote_code
    if options.tokenizer_var:
        shell.user_ns[options.tokenizer_var] = autoload.load_tokenizer(options.model_name, trust_remote_code=trust)
    shell.user_ns[options.model_var] = autoload.load_causal_lm(
        options.model_name, dtype=dtype, device_map=device_map, trust_remote_code=trust
    )


def release_targets(shell, paths: list[cellcode.TargetPath], *, release_all: bool = False) -> ReleaseResult:
    """Release the current values at `paths` that hold tensors (and, with release_all, every
    tensor holder the user can see), with every hidden copy of them.

    An object under several targets (`model`, `box.model`) is one release with all of its
    bindings dropped.
    """
    namespace = shell.user_ns
    candidates = list(paths)
    if release_all:
        candidates += [cellcode.TargetPath(name) for name, _ in shellrefs.visible_names(shell)]
    grouped: dict[int, tuple[str, Any, list[Binding]]] = {}
    for path in candidates:
        try:
            value = cellcode.resolve(path, namespace)
        except cellcode.Unresolvable:
            continue
        if id(value) not in grouped:
            if not holds_tensors(value):
                continue
            grouped[id(value)] = (path.text, value, [])
        binding = Binding(path.text, cellcode.unbinder(path, namespace))
        if all(b.label != binding.label for b in grouped[id(value)][2]):
            grouped[id(value)][2].append(binding)
    targets = [Target(label, value, tuple(bindings)) for label, value, bindings in grouped.values()]
    grouped.clear()
    value = None
    return release(targets, shellrefs.hidden_refs(shell), lambda: shellrefs.naming_roots(shell))


def bound_models(shell, paths: list[cellcode.TargetPath]) -> list[tuple[str, Any]]:
    """(name, model) for each target that now holds a torch model (pipelines: their .model)."""
    from .placement import find_model

    found: list[tuple[str, Any]] = []
    for path in paths:
        try:
            model = find_model(cellcode.resolve(path, shell.user_ns))
        except cellcode.Unresolvable:
            continue
        if model is not None and all(model is not other for _, other in found):
            found.append((path.text, model))
    return found


def kept_holders(shell, exclude: list[Any], min_bytes: int = 1 << 20) -> tuple[Holder, ...]:
    """Models (any size) and tensors (>= min_bytes) the user still has, other than `exclude`."""
    excluded = {id(obj) for obj in exclude}
    kept = []
    for path, leaf in find_tensor_holders(shellrefs.visible_names(shell)):
        if id(leaf) in excluded:
            continue
        by_device = footprint_of(leaf).by_device()
        if is_module(leaf) or sum(by_device.values()) >= min_bytes:
            kept.append(Holder(path, type(leaf).__qualname__, by_device))
    return tuple(kept)


def run_llmload(shell, options: LoadOptions, cell: str | None) -> LoadOutcome:
    from .devices import memory_snapshot
    from .placement import model_placement

    paths, run = plan_body(shell, options, cell)
    memory_before = memory_snapshot()
    released = release_targets(shell, paths, release_all=options.release_all)
    shell.user_ns["MODEL_NAME"] = options.model_name

    error, value = None, None
    if released.interrupted:
        error = KeyboardInterrupt()
    else:
        try:
            value = run()
        except BaseException as exc:  # noqa: BLE001 - shown, then re-raised by the magic
            error = _without_own_frames(exc)

    models = bound_models(shell, paths)
    placements = tuple(model_placement(model, name) for name, model in models)
    kept = kept_holders(shell, [model for _, model in models])
    del models
    warnings = _warnings(released, placements)
    report = LoadReport(
        model_name=options.model_name,
        released=released,
        models=placements,
        kept=kept,
        memory_before=memory_before,
        memory_after=memory_snapshot(),
        warnings=tuple(warnings),
        error=None if error is None else f"{type(error).__name__}: {error}".splitlines()[0][:300],
    )
    return LoadOutcome(report, error, value)


def _without_own_frames(error: BaseException) -> BaseException:
    """Start the traceback at the user's code: our orchestration frames are noise to them."""
    import os

    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None and tb.tb_frame.f_code.co_filename.startswith(package):
        tb = tb.tb_next
    return error.with_traceback(tb)


def _accelerator_present() -> bool:
    from .tensors import loaded_torch

    torch = loaded_torch()
    # is_available() asks the driver without creating a context.
    return bool(torch is not None and torch.cuda.is_available())


def _warnings(released: ReleaseResult, placements) -> list[str]:
    warnings = []
    for item in released.released:
        if not item.freed:
            warnings.append(f"{item.label} was not freed: still held by {'; '.join(item.held_by)}")
    accelerator = _accelerator_present()
    for placement in placements:
        message = placement.slow_tier_warning(accelerator)
        if message:
            warnings.append(message)
    return warnings
