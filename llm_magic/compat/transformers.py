"""transformers' private API, reached from one place, with the 4.57 / 5.x differences decided here.

The pre-flight replays the first half of `from_pretrained`: which concrete class an Auto class
builds, the init contexts and dtype it builds under, the quantizer, the device-map helper, the
sizes the placement counts and the weights the loader upcasts or re-saves. Those steps are
private functions of transformers whose names and parameters move between releases; each is
called here, by keyword, and every failure to reach or call one raises `CompatError` (an error
*inside* a helper, once called, is what the real load would raise too and is passed through).

Read in the code of transformers 4.57.6 and 5.23/5.24. torch and transformers are imported only
inside functions; `version()` reads the installed version without importing transformers.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from typing import Any, Callable

from llm_magic.compat import (
    CompatError,
    Symbol,
    call,
    call_function,
    class_method,
    resolve,
)

_AUTO = "transformers.models.auto.auto_factory"
_V5_HELPERS = "transformers.integrations.accelerate"
_T = "transformers"


def _symbol(module: str, qualname: str, used_for: str) -> Symbol:
    return Symbol(_T, module, qualname, used_for)


AUTO_BASE = _symbol(_AUTO, "_BaseAutoModelClass", "tell an Auto class from a model class")
GET_MODEL_CLASS = _symbol(_AUTO, "_get_model_class", "the concrete class an Auto class builds")
REMOTE_CLASS = _symbol("transformers.dynamic_module_utils", "get_class_from_dynamic_module",
                       "the class of a trust_remote_code checkpoint")
FROM_CONFIG = _symbol("transformers.modeling_utils", "PreTrainedModel._from_config",
                      "build a model from a config with a chosen attention implementation")
INIT_CONTEXT = _symbol("transformers.modeling_utils", "PreTrainedModel.get_init_context",
                       "the contexts from_pretrained builds the model in")
SET_DEFAULT_DTYPE = _symbol("transformers.modeling_utils", "PreTrainedModel._set_default_dtype",
                            "4.x: the default dtype the model is built in")
GET_QUANTIZER = _symbol("transformers.quantizers.auto", "get_hf_quantizer", "the quantizer of the load")
DEVICE_MAP_V5 = _symbol(_V5_HELPERS, "_get_device_map", "the device map of device_map='auto'")
DEVICE_MAP_V4 = _symbol("transformers.modeling_utils", "_get_device_map", "the device map of device_map='auto'")
MODULE_SIZES_V5 = _symbol(_V5_HELPERS, "compute_module_sizes", "quantized sizes as the placement counts them")
DTYPE_PLAN = _symbol("transformers.modeling_utils", "PreTrainedModel._get_dtype_plan",
                     "5.x: weights the loader keeps in float32")
GLOB_ALTERNATION = _symbol("transformers.core_model_loading", "build_glob_alternation",
                           "5.x: match weight names against the dtype plan")
CONVERSIONS = _symbol("transformers.conversion_mapping", "get_model_conversion_mapping",
                      "5.x: weights converted on load (re-saved when offloaded to disk)")
WEIGHT_CONVERTER = _symbol("transformers.core_model_loading", "WeightConverter",
                           "5.x: tell converted weights from renamed ones")


def private_symbols() -> tuple[Symbol, ...]:
    """The symbols reached by name with the installed version."""
    if major() >= 5:
        return (AUTO_BASE, GET_MODEL_CLASS, REMOTE_CLASS, FROM_CONFIG, INIT_CONTEXT, GET_QUANTIZER, DEVICE_MAP_V5,
                MODULE_SIZES_V5, DTYPE_PLAN, GLOB_ALTERNATION, CONVERSIONS, WEIGHT_CONVERTER)
    return (AUTO_BASE, GET_MODEL_CLASS, REMOTE_CLASS, FROM_CONFIG, INIT_CONTEXT, SET_DEFAULT_DTYPE, GET_QUANTIZER,
            DEVICE_MAP_V4)


# --------------------------------------------------------------------------- the version


def version_string() -> str:
    """The installed transformers version ("5.24.0"), without importing transformers."""
    module = sys.modules.get("transformers")
    text = getattr(module, "__version__", None)
    if isinstance(text, str):
        return text
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("transformers")
    except PackageNotFoundError:
        return "0.0"


def version(text: str | None = None) -> tuple[int, int]:
    """(major, minor) of `text` or of the installed transformers ("4.57.6" -> (4, 57))."""
    parts = (text or version_string()).split(".")
    numbers = ["".join(ch for ch in part if ch.isdigit()) or "0" for part in (parts + ["0"])[:2]]
    return int(numbers[0]), int(numbers[1])


def major() -> int:
    return version()[0]


# Behaviour that differs by version, each decided here once (see NOTES.md).
def loads_in_default_dtype(v: tuple[int, int]) -> bool:
    """4.x: no dtype given loads in torch's default dtype; 5.x: no dtype means "auto"."""
    return v[0] < 5


def follows_default_device(v: tuple[int, int]) -> bool:
    """5.x `check_and_set_device_map`: without device_map, a global default device is used."""
    return v[0] >= 5


def quantizer_updates_dtype(v: tuple[int, int]) -> bool:
    """5.x asks the quantizer for the dtype after settling it; 4.x settles it inside get_hf_quantizer."""
    return v[0] >= 5


def whole_model_on_disk_fails(v: tuple[int, int]) -> bool:
    """4.57 hands "disk" to torch/safetensors as a device name when everything maps to disk."""
    return v[:2] == (4, 57)


def offload_resaves_converted(v: tuple[int, int]) -> bool:
    """5.x offloads safetensors in place except weights a WeightConverter builds (re-saved)."""
    return v[0] >= 5


# --------------------------------------------------------------------------- the model class


def is_auto_class(cls: Any) -> bool:
    """Is `cls` one of transformers' Auto model classes (`AutoModelForCausalLM`...)?"""
    return isinstance(cls, type) and issubclass(cls, resolve(AUTO_BASE))


def concrete_class(cls: Any, config: Any, model_id: str, trust_remote_code: bool, location: dict):
    """(model class, config) the way an Auto class dispatches (`auto_factory._get_model_class`).

    A model class is returned as is. A ValueError is what from_pretrained raises too.
    """
    if not is_auto_class(cls):
        return cls, config
    auto_map = getattr(config, "auto_map", None) or {}
    if cls.__name__ in auto_map and trust_remote_code:
        model_class = call(REMOTE_CLASS, class_reference=auto_map[cls.__name__],
                           pretrained_model_name_or_path=model_id, local_files_only=True, **location)
        return model_class, config
    mapping = getattr(cls, "_model_mapping", None)
    if mapping is None:
        raise CompatError(f"{cls.__name__}._model_mapping is missing in this transformers version")
    if type(config) not in mapping:
        raise ValueError(f"Unrecognized configuration class {type(config).__name__} for {cls.__name__}")
    model_class = call(GET_MODEL_CLASS, config=config, model_mapping=mapping)
    # Both versions: a text-only class given a multimodal config gets the text sub-config.
    sub_configs = getattr(config, "sub_configs", {}) or {}
    if model_class.config_class == sub_configs.get("text_config", None):
        config = config.get_text_config()
    return model_class, config


# --------------------------------------------------------------------------- building on meta


def make_quantizer(config: Any, quantization_config: Any, dtype: Any, device_map: Any):
    """(hf_quantizer or None, config, device_map) as `get_hf_quantizer` gives them to from_pretrained."""
    if major() >= 5:
        return call(GET_QUANTIZER, config=config, quantization_config=quantization_config,
                    device_map=device_map, weights_only=True, user_agent={})
    hf_quantizer, config, _dtype, device_map = call(
        GET_QUANTIZER, config=config, quantization_config=quantization_config, dtype=dtype, from_tf=False,
        from_flax=False, device_map=device_map, weights_only=True, user_agent={})
    return hf_quantizer, config, device_map


def build_meta_model(model_class, config, dtype, hf_quantizer, device_map, checkpoint_files):
    """(model on the meta device, keep-in-fp32 regex or None), built as from_pretrained builds it.

    `config` is copied first (from_pretrained builds from a copy too).
    """
    import copy

    config = copy.deepcopy(config)
    init_context = class_method(INIT_CONTEXT, model_class)
    if major() >= 5:
        contexts = call_function(init_context, INIT_CONTEXT.path, optional=("allow_all_kernels",),
                                 dtype=dtype, is_quantized=hf_quantizer is not None, _is_ds_init_called=False,
                                 allow_all_kernels=False)
        with _entered(contexts):
            model = model_class(config)
            if hf_quantizer is not None:
                hf_quantizer.preprocess_model(model=model, dtype=dtype, device_map=device_map,
                                              checkpoint_files=checkpoint_files, use_kernels=False)
        # 5.x builds untied (`init.no_tie_weights()`); sizes skip `all_tied_weights_keys`.
        return model, None
    return _build_meta_model_v4(model_class, config, dtype, hf_quantizer, device_map, init_context)


def _build_meta_model_v4(model_class, config, dtype, hf_quantizer, device_map, init_context):
    import torch

    original = torch.get_default_dtype()
    try:
        # 4.57 `_get_dtype` sets torch's default dtype when a dtype is given; restore it after.
        if dtype is not None and dtype != original:
            class_method(SET_DEFAULT_DTYPE, model_class)(dtype)
        contexts = call_function(init_context, INIT_CONTEXT.path, is_quantized=hf_quantizer is not None,
                                 _is_ds_init_called=False)
        with _entered(contexts):
            model = model_class(config)
    finally:
        torch.set_default_dtype(original)
    model.tie_weights()
    keep = []
    keep_fp32 = getattr(model, "_keep_in_fp32_modules", None)
    if keep_fp32 is not None and (dtype == torch.float16 or getattr(hf_quantizer, "use_keep_in_fp32_modules", False)):
        keep.extend(keep_fp32)
    strict = getattr(model, "_keep_in_fp32_modules_strict", None)
    if strict is not None and dtype in (torch.float16, torch.bfloat16):
        keep.extend(strict)
    keep_regex = None
    if keep:
        import re

        keep_regex = re.compile("|".join(rf"((^|\.){module}($|\.))" for module in keep))
    if hf_quantizer is not None:
        hf_quantizer.preprocess_model(model=model, device_map=device_map, keep_in_fp32_modules=keep_fp32,
                                      config=model.config, use_kernels=False)
    return model, keep_regex


@contextlib.contextmanager
def _entered(contexts):
    # What transformers' `ContextManagers` does, without depending on it.
    with contextlib.ExitStack() as stack:
        for context in contexts:
            stack.enter_context(context)
        yield


# --------------------------------------------------------------------------- placement and sizes


def auto_device_map(model, device_map, max_memory, hf_quantizer, dtype, keep_regex) -> dict:
    """The device map from_pretrained computes for an "auto"-like `device_map`. Raises what it raises."""
    if major() >= 5:
        return call(DEVICE_MAP_V5, model=model, device_map=device_map, max_memory=max_memory,
                    hf_quantizer=hf_quantizer)
    return call(DEVICE_MAP_V4, model=model, device_map=device_map, max_memory=max_memory,
                hf_quantizer=hf_quantizer, dtype=dtype, keep_in_fp32_regex=keep_regex)


def quantized_sizes(model, hf_quantizer) -> dict[str, int] | None:
    """5.x with a quantizer: tensor name -> bytes as the placement counts them; else None."""
    if hf_quantizer is None or major() < 5:
        return None
    sizes, _leaves = call(MODULE_SIZES_V5, model=model, hf_quantizer=hf_quantizer, only_modules=False)
    names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    return {name: int(size) for name, size in sizes.items() if name in names}


def tied_names(model) -> set[str]:
    """5.x builds untied and loads the tied copies as aliases: their names, not counted twice."""
    if major() < 5:
        return set()  # 4.x ties before sizing; named_parameters yields a shared tensor once
    return set(getattr(model, "all_tied_weights_keys", None) or {})


def no_split_modules(model) -> set[str]:
    return set(getattr(model, "_no_split_modules", None) or [])


def upcast_rule(model, dtype, keep_regex) -> Callable[[str], Any] | None:
    """name -> the dtype the loader forces for that checkpoint tensor (or None); None: no rule.

    4.57: `keep_in_fp32_regex` -> float32. 5.x: `_get_dtype_plan` globs (e.g. DeepSeek-V3's
    `e_score_correction_bias`).
    """
    import torch

    if major() < 5:
        if keep_regex is None:
            return None
        return lambda name: torch.float32 if keep_regex.search(name) else None
    plan = call_function(class_method(DTYPE_PLAN, model), DTYPE_PLAN.path, dtype=dtype)
    if not plan:
        return None
    alternation, by_group, _ = call(GLOB_ALTERNATION, globs=list(plan))

    def rule(name: str):
        match = alternation.search(name)
        return plan[by_group[match.lastgroup]] if match is not None else None

    return rule


def converted_weight_patterns(model) -> list[tuple[list[str], list[str]]]:
    """5.x: (checkpoint-name globs, model-name globs) of each WeightConverter; 4.x: none."""
    if major() < 5:
        return []
    converter = resolve(WEIGHT_CONVERTER)
    conversions = call(CONVERSIONS, model=model)
    return [(list(c.source_patterns), list(c.target_patterns)) for c in conversions if isinstance(c, converter)]


@functools.lru_cache(maxsize=None)
def mla_caches_latent(model_type: str) -> bool | None:
    """Does the installed modeling code of this MLA family cache the compressed latent?

    transformers 5 (checked: 5.23) caches `(kv_nope, k_rot)` latents and re-expands them after
    the cache read, in an attention method named `expand_kv`; 4.x caches expanded K and V.
    None when the modeling module cannot be imported.
    """
    import importlib

    name = f"transformers.models.{model_type}.modeling_{model_type}"
    module = sys.modules.get(name)
    if module is None:
        try:
            module = importlib.import_module(name)
        except Exception:
            return None
    return any(
        isinstance(value, type) and callable(getattr(value, "expand_kv", None))
        for value in vars(module).values()
    )


# --------------------------------------------------------------------------- building models


def build_with_attention(model_class: type, config: Any, attention: str) -> Any:
    """`model_class` built from `config` with the attention implementation `attention`
    (`PreTrainedModel._from_config`, 4.57 and 5.x). Without it: the public constructor, whose
    attention implementation is then the config's."""
    try:
        builder = class_method(FROM_CONFIG, model_class)
    except CompatError:
        return model_class(config)
    return call_function(builder, FROM_CONFIG.path, config=config, attn_implementation=attention)


def attention_implementation(config: Any) -> str | None:
    """The attention implementation a loaded model's config records (`config._attn_implementation`,
    private in 4.57 and 5.x), None when it records none."""
    value = getattr(config, "_attn_implementation", None)
    return value if isinstance(value, str) else None
