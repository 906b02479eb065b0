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
from llm_magic.commands.load_checks import (
    StrictRefusal,
    check_sources,
    predict_loads,
    prediction_warnings,
    strict_refusal,
)
from llm_magic.commands.load_report import LoadReport, SharedWeights
from llm_magic.engine.exceptions import without_own_frames
from llm_magic.engine.holders import HolderRow, scan_holders
from llm_magic.engine.paths import (
    TargetPath,
    Unresolvable,
    parse_target,
    resolve,
)
from llm_magic.engine.release import ReleaseResult, Target, release
from llm_magic.engine.tensors import (
    Footprint,
    holds_tensors,
)
from llm_magic.ipython import shell_state
from llm_magic.names import parse_dtype


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


def kept_holders(shell, exclude: list[Any], min_bytes: int = 1 << 20) -> tuple[tuple[HolderRow, ...], tuple[str, ...]]:
    """(rows, cut): models (any size) and other holders (>= min_bytes in all) the user still has,
    other than `exclude`, and the roots whose walk was cut (what they hold may be missing). An
    object of many small tensors (a `generate` output with its cache) counts by its total;
    storages shared with `exclude` count in no row."""
    scan = scan_holders(shell_state.visible_names(shell), (), exclude=exclude)
    return tuple(row for row in scan.rows if row.is_model or row.total >= min_bytes), scan.cut


def _failure(exc: BaseException, plan: BodyPlan) -> tuple[BaseException, str | None]:
    """The body's error as the user should see it, and one plain line when a load failed.

    A load that failed inside transformers keeps only the user's frames and the one that raised.
    """
    from llm_magic.engine.exceptions import user_frames_and_raiser
    from llm_magic.predict.failures import explain_load_failure

    ids = {call.model_id.value for call in plan.load_calls if call.model_id.known and isinstance(call.model_id.value, str)}
    explanation = explain_load_failure(exc, ids.pop() if len(ids) == 1 else None)
    if explanation is None:
        return without_own_frames(exc), None
    return user_frames_and_raiser(without_own_frames(exc)), explanation


def run_llmload(shell, options: LoadOptions, cell: str | None) -> LoadOutcome:
    # One function on purpose: the order of its steps is the promise (check every source,
    # measure, release only what the cell replaces, run, measure again), read top to bottom.
    shell_state.require_shell(shell)
    from llm_magic.measure.memory import memory_snapshot
    from llm_magic.measure.placement import model_placement

    plan = plan_body(shell, options, cell)
    check_sources(plan.load_calls)
    memory_before = memory_snapshot()
    targets = collect_targets(shell, plan, release_all=options.release_all)
    kept_for_reads = _kept_for_reads(shell, plan)
    model_calls = [call for call in plan.load_calls if call.is_model]
    predictions = predict_loads(model_calls, targets, memory_before, generation_batch=options.batch if options.dry_run else None)
    hidden, naming = shell_state.hidden_refs(shell), lambda: shell_state.naming_roots(shell)

    if options.strict:
        refusal = strict_refusal(options.model_name, predictions, targets, memory_before, lambda: kept_holders(shell, [])[0])
        if refusal:
            targets.clear()
            raise StrictRefusal(refusal)
    if options.dry_run:
        released = release(targets, hidden, naming, dry_run=True)
        warnings = [w for p in predictions for w in prediction_warnings(p)]
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
    headroom = _headroom(models, memory_after, options.batch)
    kept, kept_cut = kept_holders(shell, [model for _, model in models])
    del models
    report = LoadReport(
        model_name=options.model_name,
        released=released,
        kept_for_reads=kept_for_reads,
        models=placements,
        shared=shared,
        kept=kept,
        kept_cut=kept_cut,
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


def _headroom(models, snapshot, batch: int) -> tuple:
    """The generation headroom of each model that generates text (none for encoders)."""
    from llm_magic.predict.gen_headroom import model_headroom

    found = (model_headroom(model, name, snapshot, batch=batch) for name, model in models)
    return tuple(item for item in found if item is not None)


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
