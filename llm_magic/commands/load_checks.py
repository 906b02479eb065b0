"""`%%llmload`'s checks before anything changes, and what its predictions warn about.

- the sources: a `from_pretrained` whose checkpoint cannot be found stops the cell
  (`LoadCannotStart`), before any release;
- each model load predicted with the memory free after the release (pre-flight);
- strict mode: a load predicted to land on a slower tier is refused (`StrictRefusal`).
"""

from __future__ import annotations

from typing import Callable

from llm_magic.commands.load_report import PredictedLoad
from llm_magic.engine.release import Target
from llm_magic.engine.tensors import Footprint, footprint_of
from llm_magic.units import format_by_device, format_bytes


class LoadCannotStart(ValueError):
    """A load of the cell cannot even start (no such directory, not cached offline): nothing changed."""


def check_sources(load_calls) -> None:
    """Refuse, before any release, a cell whose load would fail before reading a weight."""
    from llm_magic.predict.sources import check_load_sources

    problems = check_load_sources(load_calls)
    if problems:
        raise LoadCannotStart(f"{problems[0].reason} — nothing was released")


class StrictRefusal(RuntimeError):
    """`--strict` refused a load predicted to land on a slower tier. Nothing was changed."""

    def _render_traceback_(self) -> list[str]:
        # IPython shows this instead of a traceback: the message is the whole story.
        return [f"StrictRefusal: {self}"]


def predict_loads(calls: list, targets: list[Target], snapshot, *, generation_batch: int | None = None) -> tuple[PredictedLoad, ...]:
    """Each model load predicted with the memory that will be free after the release (and, for
    a dry run, how far generation can go on that placement: `generation_batch`)."""
    from llm_magic.predict.budget import free_after_release
    from llm_magic.predict.preflight import predict

    freed = Footprint()
    for target in targets:
        freed.merge(footprint_of(target.value))
    free, cached_unused = free_after_release(snapshot, freed.by_device())
    return tuple(
        PredictedLoad(call.target, predict(call, free, cached_unused=cached_unused, generation_batch=generation_batch))
        for call in calls
    )


def strict_refusal(name: str, predictions, targets: list[Target], snapshot, kept_holders: Callable[[], tuple]) -> str | None:
    """The refusal message when a load is predicted on a slower tier, else None."""
    slow = [p for p in predictions if p.prediction.slower_tier]
    if not slow:
        return None
    lines = []
    for item in slow:
        p = item.prediction
        missing = f"{format_bytes(p.missing_bytes)} more {p.missing_bytes_of}" if p.missing_bytes is not None else "more memory (how much is unknown)"
        lines.append(f"{item.target or name}: predicted {_off_best(p)} (slower than {p.best_device}); it needs {missing}")
    replaced = {binding.label for target in targets for binding in target.bindings}
    kept = [holder for holder in kept_holders() if holder.path not in replaced]
    if kept:
        lines.append("memory is held by: " + "; ".join(f"{h.path} ({format_by_device(h.bytes_by_device)})" for h in kept[:5]))
    for device in snapshot.cuda_devices:
        if device.other_bytes:
            lines.append(f"other processes and the CUDA context hold {format_bytes(device.other_bytes)} on {device.device}")
    return "strict mode refused the load (nothing was released or loaded): " + " | ".join(lines)


def prediction_warnings(item: PredictedLoad) -> list[str]:
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
