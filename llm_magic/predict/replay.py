"""The first half of `from_pretrained`, replayed on the meta device: no weight is read or allocated.

In the order `from_pretrained` takes them: the config (offline, with the call's config keywords
applied), the weight files' headers, the quantizer, the concrete class an Auto class builds,
the dtype the weights load in, and the model itself built under the loader's own init contexts
on the meta device. The private steps are `compat.transformers`'s; a `CompatError` from them
reaches the caller, which makes the prediction unknown with that reason.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping

from llm_magic.compat import CompatError
from llm_magic.compat import transformers as tf
from llm_magic.names import dtype_name, parse_dtype
from llm_magic.predict.checkpoint import Checkpoint, read_checkpoint, read_config
from llm_magic.predict.request import Request
from llm_magic.predict.result import Draft, Unknown


@dataclass(frozen=True)
class Replayed:
    """The model `from_pretrained` would build, on the meta device, and what it was built from."""

    model: Any  # on the meta device (its class: what the Auto class resolved to)
    dtype: Any  # torch dtype the weights load in
    keep_regex: Any  # 4.57's keep-in-fp32 pattern, or None
    hf_quantizer: Any  # None without quantization
    device_map: Any  # the call's device_map, as the quantizer may have changed it
    checkpoint: Checkpoint | None
    pre_quantized: bool  # the config carries a quantization_config


def replay(request: Request, version: tuple[int, int], draft: Draft) -> tuple[Replayed, Draft]:
    """Build the model the call would build, on meta; Unknown when an input cannot be known here."""
    config = _config(request, draft)
    checkpoint, draft = _checkpoint(request, draft)
    # Read before concrete_class may swap in a sub-config (a text config carries no quantization_config).
    pre_quantized = getattr(config, "quantization_config", None) is not None
    hf_quantizer, config, device_map, draft = _quantizer(request, config, pre_quantized, draft)
    try:
        model_class, config = tf.concrete_class(request.cls, config, request.model_id,
                                                request.trust_remote_code, dict(request.where))
    except CompatError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise Unknown(f"cannot tell which class {request.class_name} builds: {exc}", draft) from None
    draft = draft.with_(model_class=model_class.__name__)
    dtype, draft = _dtype(request, config, checkpoint, hf_quantizer, version, draft)
    try:
        model, keep_regex = tf.build_meta_model(model_class, config, dtype, hf_quantizer, device_map,
                                                list(checkpoint.files) if checkpoint else None)
    except CompatError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise Unknown(f"cannot build {model_class.__name__} on the meta device: {exc}", draft) from None
    return Replayed(model, dtype, keep_regex, hf_quantizer, device_map, checkpoint,
                    pre_quantized), draft


def _config(request: Request, draft: Draft):
    """The config, read offline; a checkpoint whose remote code we may not run is unknown."""
    unknown_trust = (f"trust_remote_code is computed by code ({request.trust_remote_code_source}) "
                     "and this checkpoint has remote code")
    trust_unknown = request.trust_remote_code_source is not None
    try:
        config = read_config(request.model_id, request.trust_remote_code, overrides=request.overrides,
                             **request.where, config_class=_config_class_for(request.cls))
    except Exception as exc:  # noqa: BLE001 - every failure here is "cannot read the config"
        if trust_unknown:
            raise Unknown(f"{unknown_trust}: {exc}", draft) from None
        raise Unknown(f"cannot read the config of {request.model_id!r} offline: {exc}", draft) from None
    if trust_unknown and request.class_name in (getattr(config, "auto_map", None) or {}):
        raise Unknown(unknown_trust, draft)
    return config


def _config_class_for(cls: Any):
    """A concrete model class reads its own `config_class`; Auto classes read AutoConfig."""
    config_class = getattr(cls, "config_class", None)
    if isinstance(config_class, type) and hasattr(config_class, "from_pretrained"):
        return config_class
    return None


def _checkpoint(request: Request, draft: Draft) -> tuple[Checkpoint | None, Draft]:
    """The weight files' headers (no weights read), and what they tell about the load."""
    try:
        checkpoint = read_checkpoint(request.model_id, variant=request.variant,
                                     use_safetensors=request.use_safetensors, **request.where)
    except Exception as exc:  # noqa: BLE001
        return None, draft.noted(f"could not read the checkpoint headers: {exc}")
    draft = draft.with_(checkpoint_bytes=checkpoint.tensor_bytes).noted(*checkpoint.notes)
    if checkpoint.format == "none":
        if os.path.isdir(request.model_id):
            draft = draft.raising(f"OSError: no weight files in {request.model_id}")
        else:
            draft = draft.noted("weights not in the local cache: from_pretrained downloads them (or fails offline)")
    return checkpoint, draft


def _quantizer(request: Request, config, pre_quantized: bool, draft: Draft):
    """(hf_quantizer, config, device_map, draft) through the loader's own helper, which also checks
    that this machine can run the quantization."""
    if not pre_quantized and request.quantization_config is None:
        return None, config, request.device_map, draft
    try:
        hf_quantizer, config, device_map = tf.make_quantizer(config, request.quantization_config, request.dtype,
                                                             request.device_map)
    except CompatError:
        raise
    except Exception as exc:  # noqa: BLE001
        draft = draft.raising(f"{type(exc).__name__}: {exc}")
        if pre_quantized and draft.checkpoint_bytes is not None:
            draft = draft.with_(total_bytes=draft.checkpoint_bytes).noted(
                "pre-quantized checkpoint: total from the checkpoint headers")
        raise Unknown("the quantizer cannot be prepared here, so placement is unknown", draft) from None
    return hf_quantizer, config, device_map, draft


def _dtype(request: Request, config, checkpoint, hf_quantizer, version, draft: Draft):
    """(torch dtype, draft) the weights load in; Unknown when that cannot be told."""
    dtype, note, error = loaded_dtype(request.dtype, config, checkpoint, version)
    if error:
        raise Unknown("dtype invalid: prediction unknown", draft.raising(error))
    if hf_quantizer is not None and tf.quantizer_updates_dtype(version) and dtype is not None:
        dtype = hf_quantizer.update_dtype(dtype)
    if note:
        draft = draft.noted(note)
    if dtype is None:
        raise Unknown("the dtype the weights load in is unknown", draft)
    draft = draft.with_(dtype=dtype_name(dtype))
    stored = checkpoint.stored_float_dtype if checkpoint is not None else None
    if stored is not None and stored != draft.dtype:
        # Say so when the weights load in another float size than they are stored in (4.x: bf16 -> fp32).
        draft = draft.noted(f"the checkpoint stores {stored}, the weights load as {draft.dtype}")
    return dtype, draft


def loaded_dtype(requested: Any, config: Any, checkpoint: Checkpoint | None, version: tuple[int, int]):
    """(torch dtype or None, note, error) the way `modeling_utils._get_dtype` settles it.

    4.57: no dtype -> `torch.get_default_dtype()` (float32). 5.x: no dtype -> "auto". "auto": the
    config's dtype, else the sharded index's `metadata.dtype`, else the first floating tensor of
    the (first) checkpoint file. A dict: its "" entry. Names as torch spells them only
    (transformers takes no "bf16").
    """
    import torch

    if requested is None:
        if tf.loads_in_default_dtype(version):
            return torch.get_default_dtype(), "no dtype given: transformers 4.x loads in the default dtype", None
        requested = "auto"
    if isinstance(requested, Mapping):
        main = requested.get("")
        if main is None:
            return torch.get_default_dtype(), "dtype dict without a '' entry: default dtype", None
        requested = main
    if isinstance(requested, str) and requested == "auto":
        for source, value in (
            ("the config", getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)),
            ("the index metadata", checkpoint.index_dtype if checkpoint and checkpoint.sharded else None),
            ("the checkpoint's first float tensor", checkpoint.first_float_dtype if checkpoint else None),
        ):
            dtype = _torch_dtype(value)
            if dtype is not None:
                return dtype, f'dtype "auto" resolves to {dtype} from {source}', None
        return None, 'dtype "auto": no dtype in the config or checkpoint headers (unknown)', None
    dtype = _torch_dtype(requested)
    if dtype is None:
        return None, None, f"invalid dtype {requested!r}: from_pretrained raises ValueError"
    return dtype, None, None


def _torch_dtype(value: Any):
    """A torch dtype from a dtype or a torch name, else None ("auto" included)."""
    try:
        dtype = parse_dtype(value, aliases=False)
    except ValueError:
        return None
    return None if dtype == "auto" else dtype
