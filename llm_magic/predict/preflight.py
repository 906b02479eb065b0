"""Predict what a `from_pretrained` call will do, before a byte of weights is read.

The prediction replays the first half of `from_pretrained` with the installed transformers:
read the config, settle the dtype, build the model on the meta device (no memory), then ask the
same helper `from_pretrained` asks for the device map (`modeling_utils._get_device_map` in 4.57,
`integrations.accelerate._get_device_map` in 5.x) with the same budget it would compute. Only
the budget differs in origin: `from_pretrained` measures free memory itself, the pre-flight is
given the free memory that will exist after the magic's release step
(`devices.free_after_release`), and applies the margins of the installed version
(`devices.loader_budget`, through `transformers_budget`). Reading the config and the weight
files without loading them is `checkpoint.py`'s job.

What cannot be known (an argument computed by code, a quantizer that cannot be prepared here, a
checkpoint that is not on disk, the free memory of a GPU CUDA has not measured) makes the
prediction "unknown" with a note that says why; it is never filled in with a guess.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

from llm_magic.measure.memory import loader_budget
from llm_magic.predict.calls import LoadCall
from llm_magic.predict.checkpoint import Checkpoint, read_checkpoint, read_config

__all__ = ["Prediction", "predict", "read_checkpoint", "read_config", "transformers_budget"]

# Placement tiers, fastest first: the point of the pre-flight is to say when a model will land
# on a slower tier than the best device the machine has.
TIER_RANK = {"accelerator": 0, "cpu": 1, "disk": 2}

# The strings `from_pretrained` treats as "compute a map" (both versions).
AUTO_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")

# Resolution of "how many more bytes would keep everything on the best device": 0.01% of the
# model (14 MB for a 70B in bf16, finer is noise next to allocator slack), at least 1 KiB.
# About 8 placement reruns whatever the size.
def _missing_resolution(total: int) -> int:
    return max(1024, total // 10_000)


# ---------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class Budget:
    """Bytes per device the placement algorithm may use, as `from_pretrained` would compute them."""

    max_memory: dict[str, float | None]  # "cuda:0" / "cpu" -> bytes (before multi-GPU balancing); None unknown
    source: str  # "max_memory argument" | "free memory, transformers 5.x margins" | ...
    notes: tuple[str, ...] = ()



@dataclass(frozen=True)
class Prediction:
    """What one `from_pretrained` call is predicted to do. None means "unknown" (see notes)."""

    status: str  # "ok" | "unknown" | "skipped" (not a model: tokenizers are not placed)
    model_id: str | None
    model_class: str | None  # the concrete class built ("LlamaForCausalLM")
    transformers_version: str
    dtype: str | None  # the dtype weights load in ("bfloat16")
    device_map: dict[str, str] | None  # module -> "cuda:0" / "cpu" / "disk"
    bytes_by_device: dict[str, int] | None  # bytes
    total_bytes: int | None  # bytes of parameters and buffers once loaded, tied weights once
    checkpoint_bytes: int | None  # bytes of the stored tensors on disk
    budget: dict[str, int | None] | None  # bytes per device the algorithm was given (after margins); None unknown
    budget_source: str | None
    best_device: str | None  # fastest tier on this machine: "cuda:0", or "cpu" without accelerator
    slowest_tier: str | None  # slowest place anything lands: "cuda:0" / "cpu" / "disk"
    slower_tier: bool | None  # anything lands on a slower tier than best_device
    missing_bytes: int | None  # more bytes best_device needs so nothing lands on a slower tier
    missing_bytes_of: str | None  # what missing_bytes adds to: "free memory on cuda:0" / "max_memory['cpu']"
    will_raise: tuple[str, ...] = ()  # errors from_pretrained will raise, as far as can be told
    notes: tuple[str, ...] = ()
    elapsed_s: float = 0.0

    @property
    def known(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "model_id": self.model_id,
            "model_class": self.model_class,
            "transformers_version": self.transformers_version,
            "dtype": self.dtype,
            "device_map": None if self.device_map is None else dict(self.device_map),
            "bytes_by_device": None if self.bytes_by_device is None else dict(self.bytes_by_device),
            "total_bytes": self.total_bytes,
            "checkpoint_bytes": self.checkpoint_bytes,
            "budget": None if self.budget is None else dict(self.budget),
            "budget_source": self.budget_source,
            "best_device": self.best_device,
            "slowest_tier": self.slowest_tier,
            "slower_tier": self.slower_tier,
            "missing_bytes": self.missing_bytes,
            "missing_bytes_of": self.missing_bytes_of,
            "will_raise": list(self.will_raise),
            "notes": list(self.notes),
            "elapsed_s": self.elapsed_s,
        }


# ---------------------------------------------------------------------------------------------
# Versions and device names


def transformers_version() -> tuple[int, int]:
    """(major, minor) of the installed transformers."""
    import transformers

    parts = transformers.__version__.split(".")
    return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)


def normalize_device(device: Any) -> str:
    """accelerate's device names (0, "cpu", "disk", torch.device) as "cuda:0" / "cpu" / "disk"."""
    if isinstance(device, bool):
        return str(device)
    if isinstance(device, int):
        return f"cuda:{device}"
    text = str(device)
    if text == "cuda":
        return "cuda:0"
    if text.isdigit():
        return f"cuda:{text}"
    return text


def normalize_device_map(device_map: Mapping[str, Any]) -> dict[str, str]:
    return {name: normalize_device(device) for name, device in device_map.items()}


def _accelerate_key(device: str) -> int | str:
    """"cuda:1" -> 1 (accelerate and transformers key accelerators by ordinal)."""
    if device.startswith("cuda:") and device[5:].isdigit():
        return int(device[5:])
    return device


def _tier(device: str) -> str:
    if device in ("cpu", "disk"):
        return device
    if device == "meta":
        return "disk"
    return "accelerator"


def _is_accelerator(device: str) -> bool:
    return _tier(device) == "accelerator"


def _accelerators(free: Mapping[str, Any]) -> list[str]:
    """Accelerator names in ordinal order ("cuda:2" before "cuda:10"), full ones included."""
    return sorted((d for d in free if _is_accelerator(d)), key=lambda d: (len(d), d))


# ---------------------------------------------------------------------------------------------
# The budget: margins of the installed version


def transformers_budget(
    free: Mapping[str, int | None],
    max_memory: Mapping[Any, Any] | None = None,
    *,
    cached_unused: Mapping[str, int] | None = None,
    version: tuple[int, int] | None = None,
    sequential: bool = False,
) -> Budget:
    """The per-device budget `from_pretrained(device_map="auto")` would give the placement algorithm.

    `free`: bytes available per device ("cuda:0", "cpu") once the release step is done, counting
    PyTorch's cached-but-unused memory on accelerators (transformers 4.57 and 5.x both add it);
    None where unknown. `cached_unused`: the part of `free` that is such cached memory (4.x adds
    it after the 90% cut). Default 0 (the release step empties the cache).

    A user `max_memory` is taken as given in both versions (strings converted by accelerate's
    `convert_file_size_to_int`); devices it leaves out get nothing. Without one, the version's
    margins: `devices.loader_budget`, the one place they are written down.
    """
    version = version or transformers_version()
    if max_memory is None:
        budget = loader_budget(free, cached_unused, transformers_version=version, sequential=sequential)
        notes = () if "cpu" in free else ("no 'cpu' entry in the free-memory figures: cpu budget unknown",)
        return Budget(dict(budget), f"free memory, transformers {version[0]}.{version[1]} margins", notes)

    from accelerate.utils import convert_file_size_to_int

    given: dict[str, float | None] = {}
    notes: list[str] = []
    for key, value in max_memory.items():
        device = normalize_device(key)
        size = convert_file_size_to_int(value) if isinstance(value, str) else value
        given[device] = size
        available = free.get(device)
        if available is not None and device != "disk" and size > available:
            notes.append(
                f"max_memory[{key!r}] = {int(size)} bytes exceeds the {int(available)} bytes free on "
                f"{device}: the load can run out of memory"
            )
    return Budget(given, "max_memory argument", tuple(notes))


# ---------------------------------------------------------------------------------------------
# dtype, model class, meta model


def _torch_dtype(value: Any):
    import torch

    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str):
        candidate = getattr(torch, value.removeprefix("torch."), None)
        if isinstance(candidate, torch.dtype):
            return candidate
    return None


def resolve_dtype(requested: Any, config: Any, checkpoint: Checkpoint | None, version: tuple[int, int]):
    """(torch dtype or None, note, error) the way `modeling_utils._get_dtype` settles it.

    4.57: no dtype -> `torch.get_default_dtype()` (float32). 5.x: no dtype -> "auto". "auto": the
    config's dtype, else the sharded index's `metadata.dtype`, else the first floating tensor of
    the (first) checkpoint file. A dict: its "" entry.
    """
    import torch

    if requested is None:
        if version[0] < 5:
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


def _model_class(cls: Any, config: Any, model_id: str, trust_remote_code: bool, location: Mapping):
    """The concrete class an Auto class dispatches to (`auto_factory._get_model_class`), and the config."""
    from transformers.models.auto import auto_factory

    if not (isinstance(cls, type) and issubclass(cls, auto_factory._BaseAutoModelClass)):
        return cls, config
    auto_map = getattr(config, "auto_map", None) or {}
    if cls.__name__ in auto_map and trust_remote_code:
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        model_class = get_class_from_dynamic_module(
            auto_map[cls.__name__], model_id, local_files_only=True, **dict(location)
        )
        return model_class, config
    if type(config) not in cls._model_mapping:
        raise ValueError(f"Unrecognized configuration class {type(config).__name__} for {cls.__name__}")
    model_class = auto_factory._get_model_class(config, cls._model_mapping)
    # Both versions: a text-only class given a multimodal config gets the text sub-config.
    sub_configs = getattr(config, "sub_configs", {}) or {}
    if model_class.config_class == sub_configs.get("text_config", None):
        config = config.get_text_config()
    return model_class, config


def _build_meta_model(model_class, config, dtype, version, hf_quantizer, device_map, checkpoint):
    """The model `from_pretrained` builds before loading: same init contexts, on the meta device."""
    import torch
    from transformers.utils.generic import ContextManagers

    config = copy.deepcopy(config)  # from_pretrained builds from a copy too
    is_quantized = hf_quantizer is not None
    if version[0] >= 5:
        contexts = model_class.get_init_context(dtype, is_quantized, False, False)
        with ContextManagers(contexts):
            model = model_class(config)
            if hf_quantizer is not None:
                hf_quantizer.preprocess_model(
                    model=model, dtype=dtype, device_map=device_map,
                    checkpoint_files=list(checkpoint.files) if checkpoint else None, use_kernels=False,
                )
        # 5.x builds untied (`init.no_tie_weights()`) and sizes skip `all_tied_weights_keys`.
        return model, None
    # 4.57: `_get_dtype` sets the torch default dtype when a dtype is given; restore it after.
    original = torch.get_default_dtype()
    try:
        if dtype is not None and dtype != original:
            model_class._set_default_dtype(dtype)
        with ContextManagers(model_class.get_init_context(is_quantized, False)):
            model = model_class(config)
    finally:
        torch.set_default_dtype(original)
    model.tie_weights()
    keep = []
    if model._keep_in_fp32_modules is not None and (
        dtype == torch.float16 or getattr(hf_quantizer, "use_keep_in_fp32_modules", False)
    ):
        keep.extend(model._keep_in_fp32_modules)
    strict = getattr(model, "_keep_in_fp32_modules_strict", None)
    if strict is not None and dtype in (torch.float16, torch.bfloat16):
        keep.extend(strict)
    keep_regex = None
    if keep:
        import re

        keep_regex = re.compile("|".join(rf"((^|\.){module}($|\.))" for module in keep))
    if hf_quantizer is not None:
        hf_quantizer.preprocess_model(
            model=model, device_map=device_map, keep_in_fp32_modules=model._keep_in_fp32_modules,
            config=model.config, use_kernels=False,
        )
    return model, keep_regex


def _make_quantizer(config, quantization_config, dtype_requested, device_map, version):
    """`quantizers.auto.get_hf_quantizer` as from_pretrained calls it, or (None, config, device_map)."""
    from transformers.quantizers.auto import get_hf_quantizer

    if version[0] >= 5:
        hf_quantizer, config, device_map = get_hf_quantizer(config, quantization_config, device_map, True, {})
    else:
        hf_quantizer, config, _, device_map = get_hf_quantizer(
            config, quantization_config, dtype_requested, False, False, device_map, True, {}
        )
    return hf_quantizer, config, device_map


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence accelerate's and transformers' chatter while we replay their placement.

    With a hypothetical accelerator key accelerate warns "Device 0 is not available"; the user
    will see the real messages when the real load runs.
    """
    loggers = [logging.getLogger(name) for name in ("accelerate", "accelerate.utils.modeling", "transformers")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


# ---------------------------------------------------------------------------------------------
# Placement


def _helper_device_map(model, device_map, max_memory, hf_quantizer, dtype, keep_regex, version) -> dict:
    """Call the placement helper from_pretrained calls. Raises what it raises."""
    if version[0] >= 5:
        from transformers.integrations.accelerate import _get_device_map

        return _get_device_map(model, device_map, max_memory, hf_quantizer)
    from transformers.modeling_utils import _get_device_map

    return _get_device_map(model, device_map, max_memory, hf_quantizer, dtype, keep_regex)


def _tensor_sizes(model, version, hf_quantizer, dtype, keep_regex) -> dict[str, int]:
    """name -> bytes of every parameter and buffer the loaded model will hold, tied weights once.

    Element sizes are the meta model's, except where loading casts: checkpoint tensors matched by
    the keep-in-fp32 rules (4.57 `keep_in_fp32_regex`, 5.x `_get_dtype_plan`, e.g. DeepSeek-V3's
    `e_score_correction_bias`) load in float32, which the placement helpers do not count.
    """
    import torch

    if hf_quantizer is not None and version[0] >= 5:
        from transformers.integrations.accelerate import compute_module_sizes

        # Quantized element sizes come from the quantizer, the way the placement counts them.
        sizes, _leaves = compute_module_sizes(model, hf_quantizer, only_modules=False)
        names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
        return {name: int(size) for name, size in sizes.items() if name in names}

    upcast = _upcast_rule(model, version, dtype, keep_regex)
    loaded = set(model.state_dict().keys()) if upcast is not None else set()
    # 5.x builds untied and skips the tied copies; 4.x ties first and named_* yields a shared
    # tensor once.
    tied = set(getattr(model, "all_tied_weights_keys", None) or {}) if version[0] >= 5 else set()
    out: dict[str, int] = {}
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if name in tied:
            continue
        size = tensor.numel() * tensor.element_size()
        if upcast is not None and name in loaded and tensor.is_floating_point():
            target = upcast(name)
            if target is not None:
                size = tensor.numel() * torch.empty((), dtype=target, device="meta").element_size()
        out[name] = size
    return out


def _upcast_rule(model, version, dtype, keep_regex):
    """name -> dtype the loader forces for that checkpoint tensor, or None; None when no rule."""
    import torch

    if version[0] < 5:
        if keep_regex is None:
            return None
        return lambda name: torch.float32 if keep_regex.search(name) else None
    try:
        plan = model._get_dtype_plan(dtype)
    except Exception:  # noqa: BLE001 - no plan helper: no upcast known
        return None
    if not plan:
        return None
    try:
        from transformers.core_model_loading import build_glob_alternation

        alternation, by_group, _ = build_glob_alternation(list(plan))
    except Exception:  # noqa: BLE001
        return None

    def rule(name: str):
        match = alternation.search(name)
        return plan[by_group[match.lastgroup]] if match is not None else None

    return rule


def _device_of(name: str, device_map: Mapping[str, str]) -> str | None:
    probe = name
    while True:
        if probe in device_map:
            return device_map[probe]
        if "" == probe:
            return None
        probe = probe.rsplit(".", 1)[0] if "." in probe else ""


def _bytes_by_device(sizes: Mapping[str, int], device_map: Mapping[str, str]) -> tuple[dict[str, int], int]:
    """(bytes per device, bytes the map does not cover)."""
    totals: dict[str, int] = {}
    uncovered = 0
    for name, size in sizes.items():
        device = _device_of(name, device_map)
        if device is None:
            uncovered += size
            continue
        totals[device] = totals.get(device, 0) + size
    return totals, uncovered


def _largest_layer(model, sizes: Mapping[str, int], no_split: set[str]) -> int:
    """Largest leaf module or no-split block: the room the algorithm keeps on its main device."""
    module_sizes: dict[str, int] = {}
    for name, size in sizes.items():
        parts = name.split(".")
        for i in range(len(parts)):
            key = ".".join(parts[:i])
            module_sizes[key] = module_sizes.get(key, 0) + size
    largest = 0
    for name, module in model.named_modules():
        if name and (not list(module.children()) or type(module).__name__ in no_split):
            largest = max(largest, module_sizes.get(name, 0))
    return largest


# ---------------------------------------------------------------------------------------------
# The prediction


class _Unknown(Exception):
    """An input the prediction needs cannot be known; the message says which."""


def predict(
    call: LoadCall,
    free: Mapping[str, int | None],
    *,
    cached_unused: Mapping[str, int] | None = None,
    find_missing: bool = True,
) -> Prediction:
    """Predict what `call` will do given `free` bytes per device ("cuda:0", "cpu") after release.

    `free` and `cached_unused` as `devices.free_after_release` gives them. A GPU whose free
    memory is None (not measured) still counts as the best device, but a `device_map="auto"`
    placement without `max_memory` is then "unknown"; a plain or explicit map is still predicted.
    Nothing is loaded: the model is built on the meta device. `find_missing` searches how many
    more bytes the best device needs to hold everything (a few more placement runs).
    """
    import transformers

    started = time.perf_counter()
    version = transformers_version()
    state = _State(call=call, free=dict(free), version=version, transformers=transformers.__version__)
    if call.kind != "model":
        state.notes.append(f"{call.class_name} loads a {call.kind}: nothing is placed on devices")
        return state.result("skipped", started)
    try:
        with _quiet():
            _predict_into(state, cached_unused, find_missing)
    except _Unknown as exc:
        state.notes.append(str(exc))
        return state.result("unknown", started)
    except Exception as exc:  # noqa: BLE001 - a helper moved or changed shape in this version
        # Not a guess and not a crash of the user's cell: the prediction is unknown, and says why.
        state.device_map = None
        state.notes.append(f"prediction failed ({type(exc).__name__}: {exc}): unknown")
        return state.result("unknown", started)
    return state.result("ok" if state.device_map is not None else "unknown", started)


@dataclass
class _State:
    """The prediction being filled in; becomes a frozen Prediction at the end."""

    call: LoadCall
    free: dict[str, int]
    version: tuple[int, int]
    transformers: str
    model_id: str | None = None
    model_class: str | None = None
    dtype: str | None = None
    device_map: dict[str, str] | None = None
    bytes_by_device: dict[str, int] | None = None
    total_bytes: int | None = None
    checkpoint_bytes: int | None = None
    budget: Budget | None = None
    missing_bytes: int | None = None
    missing_bytes_of: str | None = None
    will_raise: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def best_device(self) -> str:
        # A full GPU is still the best device present: a stale model filling it is the case to catch.
        accelerators = _accelerators(self.free)
        return accelerators[0] if accelerators else "cpu"

    def result(self, status: str, started: float) -> Prediction:
        best = self.best_device() if status != "skipped" else None
        slowest = slower = None
        if self.device_map is not None and best is not None:
            used = set(self.device_map.values())
            slowest = max(used, key=lambda d: TIER_RANK[_tier(d)]) if used else None
            slower = slowest is not None and TIER_RANK[_tier(slowest)] > TIER_RANK[_tier(best)]
        budget = self.budget
        return Prediction(
            status=status,
            model_id=self.model_id,
            model_class=self.model_class,
            transformers_version=self.transformers,
            dtype=self.dtype,
            device_map=self.device_map,
            bytes_by_device=self.bytes_by_device,
            total_bytes=self.total_bytes,
            checkpoint_bytes=self.checkpoint_bytes,
            budget=None if budget is None else {k: None if v is None else int(v) for k, v in budget.max_memory.items()},
            budget_source=None if budget is None else budget.source,
            best_device=best,
            slowest_tier=slowest,
            slower_tier=slower,
            missing_bytes=self.missing_bytes,
            missing_bytes_of=self.missing_bytes_of,
            will_raise=tuple(self.will_raise),
            notes=tuple(self.notes),
            elapsed_s=time.perf_counter() - started,
        )


def _known(arg, name: str) -> Any:
    if not arg.known:
        raise _Unknown(f"{name} is computed by code ({arg.source}): prediction unknown")
    return arg.value


def _predict_into(state: _State, cached_unused, find_missing: bool) -> None:

    call, version = state.call, state.version
    model_id = _known(call.model_id, "the model id")
    if not isinstance(model_id, (str, os.PathLike)):
        raise _Unknown(f"the model id is a {type(model_id).__name__}, not a name or path: prediction unknown")
    model_id = os.fspath(model_id)
    state.model_id = model_id
    if call.cls is None:
        raise _Unknown(f"class {call.class_expr} could not be found: prediction unknown")
    requested_dtype = _known(call.dtype, "dtype")
    device_map = _known(call.device_map, "device_map")
    max_memory = _known(call.max_memory, "max_memory")
    quantization_config = _known(call.quantization_config, "quantization_config")
    location = {name: _known(arg, name) for name, arg in call.location.items()}
    for name, arg in call.config_overrides.items():
        if not arg.known:
            state.notes.append(f"keyword {name}={arg.source} is computed by code: if it is a config "
                               "attribute the model built may differ")
    overrides = {name: arg.value for name, arg in call.config_overrides.items() if arg.known}
    if "config" in overrides:
        raise _Unknown("an explicit config= object is passed: not modelled, prediction unknown")
    offload_folder_known = call.offload_folder.known
    offload_folder = call.offload_folder.value if offload_folder_known else None

    where = {k: location[k] for k in ("revision", "subfolder", "cache_dir") if location.get(k) is not None}

    # The config (and whether it needs remote code).
    trust_unknown = not call.trust_remote_code.known
    trust = bool(call.trust_remote_code.value) if not trust_unknown else False
    unknown_trust = (f"trust_remote_code is computed by code ({call.trust_remote_code.source}) "
                     "and this checkpoint has remote code")
    try:
        config = read_config(model_id, trust, overrides=overrides, **where,
                             config_class=_config_class_for(call.cls))
    except Exception as exc:  # noqa: BLE001 - every failure here is "cannot read the config"
        if trust_unknown:
            raise _Unknown(f"{unknown_trust}: {exc}") from None
        raise _Unknown(f"cannot read the config of {model_id!r} offline: {exc}") from None
    if trust_unknown and call.class_name in (getattr(config, "auto_map", None) or {}):
        raise _Unknown(unknown_trust)

    # The weight files, headers only.
    try:
        checkpoint = read_checkpoint(model_id, variant=location.get("variant"),
                                     use_safetensors=location.get("use_safetensors"), **where)
    except Exception as exc:  # noqa: BLE001
        checkpoint = None
        state.notes.append(f"could not read the checkpoint headers: {exc}")
    if checkpoint is not None:
        state.checkpoint_bytes = checkpoint.tensor_bytes
        state.notes.extend(checkpoint.notes)
        if checkpoint.format == "none":
            if os.path.isdir(model_id):
                state.will_raise.append(f"OSError: no weight files in {model_id}")
            else:
                state.notes.append("weights not in the local cache: from_pretrained downloads them "
                                   "(or fails offline)")

    # Quantization: through the same helper, which also checks this machine can run it.
    hf_quantizer = None
    pre_quantized = getattr(config, "quantization_config", None) is not None
    if pre_quantized or quantization_config is not None:
        try:
            hf_quantizer, config, device_map = _make_quantizer(
                config, quantization_config, requested_dtype, device_map, version)
        except Exception as exc:  # noqa: BLE001
            state.will_raise.append(f"{type(exc).__name__}: {exc}")
            if pre_quantized and state.checkpoint_bytes is not None:
                state.total_bytes = state.checkpoint_bytes
                state.notes.append("pre-quantized checkpoint: total from the checkpoint headers")
            raise _Unknown("the quantizer cannot be prepared here, so placement is unknown") from None

    # The concrete class and the dtype.
    try:
        model_class, config = _model_class(call.cls, config, model_id, trust, where)
    except Exception as exc:  # noqa: BLE001
        raise _Unknown(f"cannot tell which class {call.class_name} builds: {exc}") from None
    state.model_class = model_class.__name__
    dtype, dtype_note, dtype_error = resolve_dtype(requested_dtype, config, checkpoint, version)
    if dtype_error:
        state.will_raise.append(dtype_error)
        raise _Unknown("dtype invalid: prediction unknown")
    if hf_quantizer is not None and version[0] >= 5 and dtype is not None:
        dtype = hf_quantizer.update_dtype(dtype)
    if dtype_note:
        state.notes.append(dtype_note)
    if dtype is None:
        raise _Unknown("the dtype the weights load in is unknown")
    state.dtype = str(dtype).removeprefix("torch.")
    _note_dtype_change(state, checkpoint, dtype)
    moved = [m for m in call.chained if m in ("to", "cuda", "cpu", "half", "float", "bfloat16", "double")]
    if moved:
        state.notes.append(f"the result goes through .{moved[0]}(...) in the same cell: this predicts "
                           "from_pretrained only, not where the model ends up")

    # The model, on the meta device.
    try:
        model, keep_regex = _build_meta_model(model_class, config, dtype, version, hf_quantizer,
                                              device_map, checkpoint)
    except Exception as exc:  # noqa: BLE001
        raise _Unknown(f"cannot build {model_class.__name__} on the meta device: {exc}") from None
    sizes = _tensor_sizes(model, version, hf_quantizer, dtype, keep_regex)
    state.total_bytes = sum(sizes.values())
    if pre_quantized and hf_quantizer is None and state.checkpoint_bytes is not None:
        state.total_bytes = state.checkpoint_bytes
        state.notes.append("quantization_config in the config but not supported here: total from the checkpoint")

    # The device map.
    _place(state, model, sizes, device_map, max_memory, hf_quantizer, dtype, keep_regex, cached_unused,
           find_missing)
    by_device, uncovered = _bytes_by_device(sizes, state.device_map)
    state.bytes_by_device = by_device
    if uncovered:
        state.notes.append(f"{uncovered} bytes of weights are not covered by the device_map")
    _check_disk(state, model, checkpoint, offload_folder, offload_folder_known, version)


def _place(state: _State, model, sizes, device_map, max_memory, hf_quantizer, dtype, keep_regex,
           cached_unused, find_missing: bool) -> None:
    """Fill in state.device_map the way from_pretrained settles it for this `device_map` value."""
    import torch

    version = state.version
    if device_map is None:
        target = "cpu"
        if version[0] >= 5:
            # 5.x `check_and_set_device_map`: a global default device / device context is used.
            default = str(torch.get_default_device())
            if default != "cpu":
                target = normalize_device(default)
        state.device_map = {"": target}
        state.notes.append(f"no device_map: the model loads wholly on {target}")
    elif isinstance(device_map, str) and device_map in AUTO_MAPS:
        budget = transformers_budget(free=state.free, max_memory=max_memory, cached_unused=cached_unused,
                                     version=version, sequential=device_map == "sequential")
        state.budget = budget
        state.notes.extend(budget.notes)
        if max_memory is None and "cpu" not in state.free:
            raise _Unknown("free memory for cpu not given: the cpu budget is unknown")
        unknown = [device for device, value in budget.max_memory.items() if value is None]
        if unknown:
            raise _Unknown(f"free memory on {', '.join(unknown)} is not measured (CUDA not initialised in this "
                           "process, or none of its memory there): placement unknown")
        # A user max_memory goes to the helper as written, so that what it rejects ("cuda:0" keys
        # in accelerate 1.15) is rejected here too; our own budget uses accelerate's int keys.
        if max_memory is not None:
            helper_budget = dict(max_memory)
        else:
            helper_budget = {_accelerate_key(k): v for k, v in budget.max_memory.items()}
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                raw = _helper_device_map(model, device_map, dict(helper_budget), hf_quantizer, dtype,
                                         keep_regex, version)
        except Exception as exc:  # noqa: BLE001 - the real call would raise the same
            state.will_raise.append(f"{type(exc).__name__}: {exc}")
            raise _Unknown("the placement helper raised: from_pretrained will fail the same way") from None
        # accelerate's own warnings (e.g. offloaded buffers that fit no GPU) are worth passing on.
        state.notes.extend(dict.fromkeys(str(w.message) for w in caught))
        state.device_map = normalize_device_map(raw)
        if find_missing:
            _find_missing(state, model, sizes, helper_budget, max_memory, device_map, hf_quantizer, dtype,
                          keep_regex, cached_unused)
    elif isinstance(device_map, Mapping):
        state.device_map = normalize_device_map(device_map)
        state.notes.append("device_map given explicitly: placement taken as written")
    elif isinstance(device_map, (str, int, torch.device)):
        state.device_map = {"": normalize_device(device_map)}
    else:
        state.will_raise.append(f"ValueError: device_map {device_map!r} is not understood by from_pretrained")
        raise _Unknown("device_map not understood")



def _note_dtype_change(state: _State, checkpoint: Checkpoint | None, dtype) -> None:
    """Say so when the weights load in another float size than they are stored in (4.x: bf16 -> fp32)."""
    stored = checkpoint.stored_float_dtype if checkpoint is not None else None
    if stored is not None and stored != state.dtype:
        state.notes.append(f"the checkpoint stores {stored}, the weights load as {state.dtype}")


def _config_class_for(cls: Any):
    """A concrete model class reads its own `config_class`; Auto classes read AutoConfig."""
    config_class = getattr(cls, "config_class", None)
    if isinstance(config_class, type) and hasattr(config_class, "from_pretrained"):
        return config_class
    return None


def _check_disk(state: _State, model, checkpoint, offload_folder, folder_known: bool, version) -> None:
    """Errors of disk offload that can be told from the map and the files."""
    if state.device_map is None or "disk" not in state.device_map.values():
        return
    if not folder_known:
        state.notes.append("offload_folder is computed by code: whether disk offload works is unknown")
        return
    fmt = checkpoint.format if checkpoint else None
    if offload_folder is None and fmt == "bin":
        state.will_raise.append(
            "ValueError: modules map to disk and the checkpoint is not safetensors: from_pretrained asks for "
            "an offload_folder")
    if version[0] == 4 and version[1] == 57 and set(state.device_map.values()) == {"disk"}:
        # Seen on 4.57.6: the loader hands "disk" to torch / safetensors as a device name.
        error = ("SafetensorError: device disk is invalid" if fmt == "safetensors"
                 else "RuntimeError: Expected one of cpu, cuda, ... device type at start of device string: disk")
        state.will_raise.append(f"{error} (transformers 4.57 fails when the whole model maps to disk)")
    if offload_folder is None and fmt == "safetensors" and version[0] >= 5:
        converted = _converted_on_disk(model, checkpoint, state.device_map)
        if converted is None:
            state.notes.append("disk offload reads the safetensors in place; weights converted on load "
                               "(most MoE) would need an offload_folder: could not check")
        elif converted:
            state.will_raise.append(
                "ValueError: weights mapped to disk are converted on load (e.g. "
                f"{converted[0]}) and must be re-saved: from_pretrained asks for an offload_folder")


def _converted_on_disk(model, checkpoint, device_map) -> list[str] | None:
    """5.x: disk-mapped parameters built by a WeightConverter (fused MoE experts), or None if unknown.

    5.x offloads safetensors weights in place, except those a `WeightConverter` builds from
    several checkpoint tensors: it re-saves those, which needs an offload_folder
    (`core_model_loading.offload_and_maybe_resave_param`).
    """
    import re

    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter

        conversions = get_model_conversion_mapping(model)
    except Exception:  # noqa: BLE001
        return None
    disk = [name for name in model.state_dict() if _device_of(name, device_map) == "disk"]
    found: list[str] = []
    for conversion in conversions:
        if not isinstance(conversion, WeightConverter):
            continue
        sources = [re.compile(p.replace("*", ".*")) for p in conversion.source_patterns]
        if checkpoint.keys and not any(rx.search(k) for rx in sources for k in checkpoint.keys):
            continue  # the checkpoint already stores the converted form
        targets = [re.compile(p.replace("*", ".*")) for p in conversion.target_patterns]
        found.extend(name for name in disk if any(rx.search(name) for rx in targets))
    return found


def _find_missing(state, model, sizes, helper_budget, max_memory, device_map, hf_quantizer, dtype, keep_regex,
                  cached_unused) -> None:
    """How many more bytes the best device needs so that nothing lands on a slower tier.

    A bisection over the best device's budget between the model's total (necessary) and total +
    largest layer (sufficient: the algorithm keeps that much room on its main device), each step a
    rerun of the same placement helper. Reported in the units the user controls: free memory, or
    the max_memory entry when one was passed.
    """
    best = state.best_device()
    used = set(state.device_map.values())
    if not any(TIER_RANK[_tier(d)] > TIER_RANK[_tier(best)] for d in used):
        state.missing_bytes = 0
        return
    if len(_accelerators(state.free)) > 1:
        state.notes.append("several accelerators: bytes missing to avoid offload not computed")
        return
    no_split = set(getattr(model, "_no_split_modules", None) or [])
    total = sum(sizes.values())
    hi = float(total + _largest_layer(model, sizes, no_split))
    lo = float(max(total - 1, 0))
    key = _accelerate_key(best)
    version = state.version

    def fits(best_budget: float) -> bool:
        trial = dict(helper_budget)
        trial[key] = best_budget
        raw = _helper_device_map(model, device_map, trial, hf_quantizer, dtype, keep_regex, version)
        return all(TIER_RANK[_tier(normalize_device(d))] <= TIER_RANK[_tier(best)] for d in raw.values())

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the reruns repeat the first run's warnings
            for _ in range(8):  # the bound above should fit at once; doubling guards the unexpected
                if fits(hi):
                    break
                hi *= 2
            else:
                state.notes.append("bytes missing to avoid offload: no budget found (unknown)")
                return
            while hi - lo > _missing_resolution(total):
                mid = (lo + hi) / 2
                if fits(mid):
                    hi = mid
                else:
                    lo = mid
    except Exception as exc:  # noqa: BLE001
        state.notes.append(f"bytes missing to avoid offload: search failed ({exc})")
        return
    needed_budget = hi
    if max_memory is not None:
        current = helper_budget.get(key, helper_budget.get(best, 0))
        if isinstance(current, str):
            from accelerate.utils import convert_file_size_to_int

            current = convert_file_size_to_int(current)
        state.missing_bytes = max(0, math.ceil(needed_budget - current))
        state.missing_bytes_of = f"max_memory[{key!r}]"
        return
    needed_free = _free_for_budget(state, best, needed_budget, cached_unused, device_map == "sequential")
    state.missing_bytes = max(0, needed_free - state.free[best])
    state.missing_bytes_of = f"free memory on {best}"


def _free_for_budget(state, device: str, budget: float, cached_unused, sequential: bool) -> int:
    """The least free memory on `device` whose budget (`transformers_budget`) reaches `budget`."""

    def budget_of(free: int) -> float:
        figures = {**state.free, device: free}
        return transformers_budget(figures, cached_unused=cached_unused, version=state.version,
                                   sequential=sequential).max_memory[device]

    low, high = 0, max(1, math.ceil(budget))
    while budget_of(high) < budget:
        high *= 2
    while low < high:  # the budget grows with free memory: bisect on the arithmetic alone
        middle = (low + high) // 2
        if budget_of(middle) >= budget:
            high = middle
        else:
            low = middle + 1
    return high
