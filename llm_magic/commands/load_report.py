"""The load report: plain data about one `%%llmload`, holding no model and no tensor.

Returned by `%%llmload -o`; rendered by `render.py`; `to_dict()` gives JSON-able data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llm_magic.engine.holders import HolderRow
from llm_magic.engine.release import ReleaseResult


def _as_dict(value: Any) -> Any:
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [_as_dict(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _as_dict(item) for key, item in value.items()}
    return value


@dataclass(frozen=True)
class PredictedLoad:
    """The pre-flight prediction for one model `from_pretrained` call of the cell."""

    target: str | None  # what the call is assigned to ("model"), as written
    prediction: Any  # preflight.Prediction

    def to_dict(self) -> dict:
        return {"target": self.target, "prediction": self.prediction.to_dict()}


@dataclass(frozen=True)
class SharedWeights:
    """Two models the cell bound share storage (a PEFT model and its base): counted once."""

    name: str
    shared_with: str
    bytes_by_device: dict[str, int]

    def to_dict(self) -> dict:
        return {"name": self.name, "shared_with": self.shared_with, "bytes_by_device": dict(self.bytes_by_device)}


@dataclass(frozen=True)
class LoadReport:
    model_name: str
    released: ReleaseResult = field(default_factory=ReleaseResult)
    kept_for_reads: tuple[str, ...] = ()  # targets not released: the body reads them before rebinding
    models: tuple = ()  # placement.ModelPlacement, one per model the body bound
    shared: tuple[SharedWeights, ...] = ()  # storage a model shares with one listed before it
    kept: tuple[HolderRow, ...] = ()  # tensor holders still in the namespace
    kept_cut: tuple[str, ...] = ()  # roots whose walk was cut: holders inside may be missing from `kept`
    memory_before: Any = None  # devices.MemorySnapshot
    memory_after: Any = None
    predictions: tuple[PredictedLoad, ...] = ()  # one per model load call, made before the release
    headroom: tuple = ()  # headroom.Headroom per model
    warnings: tuple[str, ...] = ()
    error: str | None = None  # the body's exception, one line
    load_failure: str | None = None  # when a load failed inside transformers: why, in plain words
    dry_run: bool = False
    magic: str = "%%llmload"  # as the user typed it: "%llmload" for the line form (the report's heading)

    def to_dict(self) -> dict:
        return {
            "model_name": self.model_name,
            "released": _as_dict(self.released),
            "kept_for_reads": list(self.kept_for_reads),
            "models": _as_dict(self.models),
            "shared": _as_dict(self.shared),
            "kept": _as_dict(self.kept),
            "kept_cut": list(self.kept_cut),
            "memory_before": _as_dict(self.memory_before),
            "memory_after": _as_dict(self.memory_after),
            "predictions": _as_dict(self.predictions),
            "headroom": _as_dict(self.headroom),
            "warnings": list(self.warnings),
            "error": self.error,
            "load_failure": self.load_failure,
            "dry_run": self.dry_run,
        }

    def _repr_mimebundle_(self, include=None, exclude=None) -> dict:
        from llm_magic.render.core import mimebundle
        from llm_magic.render.load import render_load_report

        return mimebundle(render_load_report(self), include=include, exclude=exclude)
