"""What `%%llmload` does, step by step; the magic only parses arguments and shows the report.

1. read the body (syntax checked before anything changes) and the targets it assigns;
2. release the current values of those targets that hold tensors, and every hidden copy;
3. run the body (or the default loader) with MODEL_NAME bound;
4. measure where each model the body bound has landed, and what is still loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from llm_magic.commands import autoload
from llm_magic.commands.cell_plan import (
    bound_models,
    read_cell,
    release_targets,
    run_body,
)
from llm_magic.commands.load_report import LoadReport, PredictedLoad, SharedWeights
from llm_magic.commands.tracebacks import without_own_frames
from llm_magic.engine.holders import HolderRows, scan_holders
from llm_magic.engine.paths import (
    TargetPath,
    Unresolvable,
    parse_target,
    resolve,
)
from llm_magic.engine.release import ReleaseResult, Target, release
from llm_magic.engine.tensors import (
    Footprint,
    footprint_of,
    holds_tensors,
)
from llm_magic.ipython import shell_state
from llm_magic.names import parse_dtype
from llm_magic.units import format_by_device, format_bytes


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


def _is_empty(source: str) -> bool:
    return not any(line.strip() and not line.strip().startswith("#") for line in source.splitlines())


@dataclass
class BodyPlan:
    targets: tuple[TargetPath, ...]  # what the run will assign
    read_first: tuple[TargetPath, ...]  # of those, the ones the body reads first: never released
    run: Callable[[], Any]  # runs the body (or the default loader)
    load_calls: tuple  # predict.calls.LoadCall for each `from_pretrained` in it (models, tokenizers)
    reads_name: Callable[[str], bool] = lambda name: False  # does the body read this name first?


def plan_body(shell, options: LoadOptions, cell: str | None) -> BodyPlan:
    """Read the body (or the options of the default loader). Raises before any change."""
    from llm_magic.predict.calls import load_call

    if cell is None or _is_empty(cell):
        targets = [parse_target(options.model_var)]
        if options.tokenizer_var:
            targets.insert(0, parse_target(options.tokenizer_var))
        dtype = parse_dtype(options.dtype)  # a bad dtype fails here, before release
        device_map = autoload.parse_device_map(options.device_map)
        arguments = {"dtype": dtype, "trust_remote_code": options.trust_remote_code}
        if device_map is not None:
            arguments["device_map"] = device_map
        call = load_call(options.model_name, "AutoModelForCausalLM", target=options.model_var, **arguments)
        return BodyPlan(tuple(targets), (), lambda: _run_default_loader(shell, options, dtype, device_map), (call,))
    # MODEL_NAME is bound only once the release is done; the prediction needs it now.
    namespace = {**shell.user_ns, "MODEL_NAME": options.model_name}
    plan = read_cell(shell.transform_cell(cell), namespace)
    return BodyPlan(
        plan.targets,
        plan.read_first,
        lambda: run_body(shell, plan),
        plan.load_calls,
        lambda name: plan.reads.before_binding(TargetPath(name)),
    )


def _run_default_loader(shell, options: LoadOptions, dtype: Any, device_map: Any) -> None:
    from llm_magic.measure.memory import memory_snapshot
    from llm_magic.predict.budget import loader_max_memory

    trust = options.trust_remote_code
    if options.tokenizer_var:
        shell.user_ns[options.tokenizer_var] = autoload.load_tokenizer(options.model_name, trust_remote_code=trust)
    # Measured now, after the release: the placement must not depend on what happened to be
    # alive while the call was evaluated. None (a GPU not yet measured) lets the load measure.
    max_memory = loader_max_memory(memory_snapshot(), sequential=device_map == "sequential") if device_map in ("auto", "sequential") else None
    shell.user_ns[options.model_var] = autoload.load_causal_lm(
        options.model_name, dtype=dtype, device_map=device_map, max_memory=max_memory, trust_remote_code=trust
    )


def collect_targets(shell, plan: BodyPlan, *, release_all: bool = False) -> list[Target]:
    """The current values the body replaces that hold tensors (and, with release_all, every
    tensor holder the user can see that the body does not read first), as release targets."""
    extra = []
    if release_all:
        extra = [name for name, _ in shell_state.visible_names(shell) if not plan.reads_name(name)]
    replaced = [path for path in plan.targets if path not in plan.read_first]
    return release_targets(shell.user_ns, replaced, extra)


def _kept_for_reads(shell, plan: BodyPlan) -> tuple[str, ...]:
    """The targets kept because the body reads them first, when they hold something."""
    kept = []
    for path in plan.read_first:
        try:
            value = resolve(path, shell.user_ns)
        except Unresolvable:
            continue
        if holds_tensors(value):
            kept.append(path.text)
    return tuple(kept)


def kept_holders(shell, exclude: list[Any], min_bytes: int = 1 << 20) -> HolderRows:
    """Models (any size) and other holders (>= min_bytes in all) the user still has, other than
    `exclude`. An object of many small tensors (a `generate` output with its cache) counts by
    its total; storages shared with `exclude` count in no row. `.cut` names the roots whose
    walk was cut (what they hold may be missing)."""
    scan = scan_holders(shell_state.visible_names(shell), (), exclude=exclude)
    return HolderRows.of((row for row in scan.rows if row.is_model or row.total >= min_bytes), scan.cut)


class LoadCannotStart(ValueError):
    """A load of the cell cannot even start (no such directory, not cached offline): nothing changed."""


def _check_sources(plan: BodyPlan) -> None:
    """Refuse, before any release, a cell whose load would fail before reading a weight."""
    from llm_magic.predict.sources import check_load_sources

    problems = check_load_sources(plan.load_calls)
    if problems:
        raise LoadCannotStart(f"{problems[0].reason} — nothing was released")


def _failure(exc: BaseException, plan: BodyPlan) -> tuple[BaseException, str | None]:
    """The body's error as the user should see it, and one plain line when a load failed.

    A load that failed inside transformers keeps only the user's frames and the one that raised.
    """
    from llm_magic.commands.tracebacks import user_frames_and_raiser
    from llm_magic.predict.failures import explain_load_failure

    ids = {call.model_id.value for call in plan.load_calls if call.model_id.known and isinstance(call.model_id.value, str)}
    explanation = explain_load_failure(exc, ids.pop() if len(ids) == 1 else None)
    if explanation is None:
        return without_own_frames(exc), None
    return user_frames_and_raiser(without_own_frames(exc)), explanation


class StrictRefusal(RuntimeError):
    """`--strict` refused a load predicted to land on a slower tier. Nothing was changed."""

    def _render_traceback_(self) -> list[str]:
        # IPython shows this instead of a traceback: the message is the whole story.
        return [f"StrictRefusal: {self}"]


def _predict(calls: list, targets: list[Target], snapshot) -> tuple[PredictedLoad, ...]:
    """Each model load predicted with the memory that will be free after the release."""
    from llm_magic.predict.budget import free_after_release
    from llm_magic.predict.preflight import predict

    freed = Footprint()
    for target in targets:
        freed.merge(footprint_of(target.value))
    free, cached_unused = free_after_release(snapshot, freed.by_device())
    return tuple(PredictedLoad(call.target, predict(call, free, cached_unused=cached_unused)) for call in calls)


def _strict_message(shell, options: LoadOptions, predictions, targets: list[Target], snapshot) -> str | None:
    slow = [p for p in predictions if p.prediction.slower_tier]
    if not slow:
        return None
    lines = []
    for item in slow:
        p = item.prediction
        missing = f"{format_bytes(p.missing_bytes)} more {p.missing_bytes_of}" if p.missing_bytes is not None else "more memory (how much is unknown)"
        lines.append(f"{item.target or options.model_name}: predicted {_off_best(p)} (slower than {p.best_device}); it needs {missing}")
    replaced = {binding.label for target in targets for binding in target.bindings}
    kept = [holder for holder in kept_holders(shell, []) if holder.path not in replaced]
    if kept:
        lines.append("memory is held by: " + "; ".join(f"{h.path} ({format_by_device(h.bytes_by_device)})" for h in kept[:5]))
    for device in snapshot.cuda_devices:
        if device.other_bytes:
            lines.append(f"other processes and the CUDA context hold {format_bytes(device.other_bytes)} on {device.device}")
    return "strict mode refused the load (nothing was released or loaded): " + " | ".join(lines)


def run_llmload(shell, options: LoadOptions, cell: str | None) -> LoadOutcome:
    shell_state.require_shell(shell)
    from llm_magic.measure.headroom import generation_headroom
    from llm_magic.measure.memory import memory_snapshot
    from llm_magic.measure.placement import model_placement

    plan = plan_body(shell, options, cell)
    _check_sources(plan)
    memory_before = memory_snapshot()
    targets = collect_targets(shell, plan, release_all=options.release_all)
    kept_for_reads = _kept_for_reads(shell, plan)
    predictions = _predict([call for call in plan.load_calls if call.is_model], targets, memory_before)
    hidden, naming = shell_state.hidden_refs(shell), lambda: shell_state.naming_roots(shell)

    if options.strict:
        refusal = _strict_message(shell, options, predictions, targets, memory_before)
        if refusal:
            targets.clear()
            raise StrictRefusal(refusal)
    if options.dry_run:
        released = release(targets, hidden, naming, dry_run=True)
        warnings = [w for p in predictions for w in _prediction_warnings(p)]
        report = LoadReport(
            options.model_name, released, predictions=predictions, memory_before=memory_before, warnings=tuple(warnings),
            kept_for_reads=kept_for_reads, dry_run=True,
        )
        return LoadOutcome(report)

    released = release(targets, hidden, naming)
    shell.user_ns["MODEL_NAME"] = options.model_name
    error, value, load_failure = None, None, None
    if released.interrupted:
        error = KeyboardInterrupt()
    else:
        try:
            value = plan.run()
        except BaseException as exc:  # noqa: BLE001 - shown, then re-raised by the magic
            error, load_failure = _failure(exc, plan)

    memory_after = memory_snapshot()
    models = bound_models(shell.user_ns, plan.targets)
    placements = tuple(model_placement(model, name) for name, model in models)
    shared = _shared_weights(models)
    headroom = tuple(generation_headroom(model, name, memory_after, batch=options.batch) for name, model in models)
    kept = kept_holders(shell, [model for _, model in models])
    del models
    report = LoadReport(
        model_name=options.model_name,
        released=released,
        kept_for_reads=kept_for_reads,
        models=placements,
        shared=shared,
        kept=kept,
        memory_before=memory_before,
        memory_after=memory_after,
        predictions=predictions,
        headroom=headroom,
        warnings=tuple(_warnings(released, placements, memory_after.accelerator_present)),
        error=None if error is None else f"{type(error).__name__}: {error}".splitlines()[0][:300],
        load_failure=load_failure,
    )
    return LoadOutcome(report, error, value)


def _shared_weights(models: list[tuple[str, Any]]) -> tuple[SharedWeights, ...]:
    """For each model, the storage it shares with one bound before it (a PEFT model and its base)."""
    footprints = [(name, Footprint().add(model)) for name, model in models]
    shared = []
    for index, (name, footprint) in enumerate(footprints):
        for other, earlier in footprints[:index]:
            common = footprint.storage_keys & earlier.storage_keys
            if common:
                shared.append(SharedWeights(name, other, footprint.restricted_to(common).by_device()))
                break
    return tuple(shared)


def _prediction_warnings(item: PredictedLoad) -> list[str]:
    p = item.prediction
    warnings = [f"predicted: {message}" for message in p.will_raise]
    if p.slower_tier:
        missing = f"; {p.best_device} needs {format_bytes(p.missing_bytes)} more" if p.missing_bytes else ""
        warnings.append(f"predicted: {item.target or 'the model'} would put {_off_best(p)}{missing}")
    return warnings


def _off_best(prediction) -> str:
    """'3.1 GiB on cpu, 2 GiB on disk': what the prediction puts off the best device."""
    placed = sorted((prediction.bytes_by_device or {}).items())
    return ", ".join(f"{format_bytes(n)} on {device}" for device, n in placed if device != prediction.best_device)


def _warnings(released: ReleaseResult, placements, accelerator: bool) -> list[str]:
    """`accelerator`: the machine has one (`memory.accelerator_present`, the same answer the
    report's highlighted rows follow)."""
    warnings = []
    for item in released.released:
        if not item.freed:
            warnings.append(f"{item.label} was not freed: still held by {'; '.join(item.held_by)}")
    for placement in placements:
        message = placement.slow_tier_warning(accelerator)
        if message:
            warnings.append(message)
    return warnings
