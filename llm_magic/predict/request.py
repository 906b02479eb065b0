"""The arguments of one `from_pretrained` call, as values the prediction can use.

`calls.LoadCall` keeps each argument with whether it could be read without running code; here
they are taken as values, and the first one that needs code to run makes the prediction unknown
(saying which, with its source text), instead of being guessed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping

from llm_magic.predict.calls import LoadCall
from llm_magic.predict.expressions import Arg
from llm_magic.predict.result import Draft, Unknown

# Methods whose result is not where from_pretrained put the model.
_MOVES = ("to", "cuda", "cpu", "half", "float", "bfloat16", "double")


@dataclass(frozen=True)
class Request:
    """What one call asks for, every value known."""

    model_id: str
    cls: Any  # the class `from_pretrained` is called on
    class_name: str
    dtype: Any  # as written: None, "auto", a torch dtype, a name, a dict
    device_map: Any
    max_memory: Mapping[Any, Any] | None
    quantization_config: Any
    where: Mapping[str, Any]  # revision / subfolder / cache_dir, when given
    variant: str | None
    use_safetensors: bool | None
    overrides: Mapping[str, Any]  # other keywords: config attributes
    offload_folder: Any
    offload_folder_known: bool
    trust_remote_code: bool
    trust_remote_code_source: str | None  # the expression, when it is computed by code (else None)


def _known(arg: Arg, name: str, draft: Draft) -> Any:
    if not arg.known:
        raise Unknown(f"{name} is computed by code ({arg.source}): prediction unknown", draft)
    return arg.value


def read_request(call: LoadCall, draft: Draft) -> tuple[Request, Draft]:
    """The call's arguments as values, and the draft with the model id and notes; or Unknown."""
    model_id = _known(call.model_id, "the model id", draft)
    if not isinstance(model_id, (str, os.PathLike)):
        raise Unknown(f"the model id is a {type(model_id).__name__}, not a name or path: prediction unknown", draft)
    model_id = os.fspath(model_id)
    draft = draft.with_(model_id=model_id)
    if call.cls is None:
        raise Unknown(f"class {call.class_expr} could not be found: prediction unknown", draft)
    values = {name: _known(getattr(call, name), name, draft)
              for name in ("dtype", "device_map", "max_memory", "quantization_config")}
    location = {name: _known(arg, name, draft) for name, arg in call.location.items()}
    for name, arg in call.config_overrides.items():
        if not arg.known:
            draft = draft.noted(f"keyword {name}={arg.source} is computed by code: if it is a config "
                                "attribute the model built may differ")
    overrides = {name: arg.value for name, arg in call.config_overrides.items() if arg.known}
    if "config" in overrides:
        raise Unknown("an explicit config= object is passed: not modelled, prediction unknown", draft)
    moved = [m for m in call.chained if m in _MOVES]
    if moved:
        draft = draft.noted(f"the result goes through .{moved[0]}(...) in the same cell: this predicts "
                            "from_pretrained only, not where the model ends up")
    trust = call.trust_remote_code
    request = Request(
        model_id=model_id,
        cls=call.cls,
        class_name=call.class_name,
        where={k: location[k] for k in ("revision", "subfolder", "cache_dir") if location.get(k) is not None},
        variant=location.get("variant"),
        use_safetensors=location.get("use_safetensors"),
        overrides=overrides,
        offload_folder=call.offload_folder.value if call.offload_folder.known else None,
        offload_folder_known=call.offload_folder.known,
        trust_remote_code=bool(trust.value) if trust.known else False,
        trust_remote_code_source=None if trust.known else trust.source,
        **values,
    )
    return request, draft
