"""Device and dtype names: the one place that says how they are written, ordered and read.

Devices. A device is named the way PyTorch prints a tensor's device, with its index always
written: "cuda:0", "xpu:1", "mps:0", then the host tiers "cpu" and "disk", and "meta" (bytes that
are nowhere we can tell). Decided once:

- A bare accelerator kind gets index 0 ("cuda" -> "cuda:0", "mps" -> "mps:0"): PyTorch treats
  them as the same device, and a tensor made on "mps" reports `mps:0`, so measured rows and
  predicted rows only match when both carry the index.
- accelerate and transformers key GPUs by ordinal (0, "1"); those are CUDA ordinals: "cuda:0".
- Everything that is not cpu, disk or meta is an accelerator.

Tiers, fastest first: accelerator, cpu, disk. "meta" ranks with disk (its bytes are not where
compute happens). The point of the pre-flight and the slow-tier warning is to say when a model
lands on a slower tier than the best one the machine has.

Dtypes. `parse_dtype` reads every spelling the package accepts ("bf16", "torch.float16",
`torch.bfloat16`, "auto"); `dtype_name` names one. torch is imported
only inside those functions: this module is imported by `%load_ext`'s light paths.
"""

from __future__ import annotations

from typing import Any

HOST_DEVICES = ("cpu", "disk", "meta")

# Accelerator kinds in display order; kinds not listed sort after these, before the host tiers.
ACCELERATOR_ORDER = ("cuda", "xpu", "mps")

TIER_RANK = {"accelerator": 0, "cpu": 1, "disk": 2}

# Short spellings people write (and `%llmload --dtype` accepts). transformers itself accepts
# only torch's own attribute names, so the pre-flight parses with `aliases=False`.
DTYPE_ALIASES = {
    "bf16": "bfloat16",
    "fp16": "float16",
    "half": "float16",
    "fp32": "float32",
    "float": "float32",
    "fp64": "float64",
    "double": "float64",
}

# The dtypes a user is offered (`%llmload --dtype`, its help, the README, this error); the
# first is the default. Any other torch dtype name is accepted too.
DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32")
_UNKNOWN_DTYPE = "unknown dtype {value!r} (use " + ", ".join(DTYPE_CHOICES[:-1]) + f", {DTYPE_CHOICES[-1]} or a torch dtype)"


# --------------------------------------------------------------------------- devices


def normalize_device(device: Any) -> str:
    """Any device spelling (0, "1", "cuda", torch.device("mps"), "disk") as "cuda:0" / "mps:0" / "disk"."""
    if isinstance(device, bool):  # a bool is an int to Python, but no device
        return str(device)
    if isinstance(device, int):
        return f"cuda:{device}"
    text = str(device)
    if text.isdigit():
        return f"cuda:{text}"
    if text in HOST_DEVICES or ":" in text or not text:
        return text
    return f"{text}:0"


def normalize_device_map(device_map: Any) -> dict[str, str]:
    """A device map (module -> device, as accelerate writes it) with normalized device names."""
    return {str(name): normalize_device(device) for name, device in device_map.items()}


def accelerate_key(device: str) -> int | str:
    """"cuda:1" -> 1: accelerate and transformers key accelerators by ordinal in `max_memory`."""
    kind, _, index = device.partition(":")
    return int(index) if kind == "cuda" and index.isdigit() else device


def is_accelerator(device: str) -> bool:
    """Everything but host memory: "cuda:0", "xpu:0", "mps:0" are; "cpu", "disk", "meta" are not."""
    return bool(device) and device not in HOST_DEVICES


def tier(device: str) -> str:
    """"accelerator", "cpu" or "disk" ("meta" counts as disk: its bytes are not where compute runs)."""
    if device == "cpu":
        return "cpu"
    if device in ("disk", "meta"):
        return "disk"
    return "accelerator"


def tier_rank(device: str) -> int:
    """0 for an accelerator, 1 for cpu, 2 for disk: larger is slower."""
    return TIER_RANK[tier(device)]


def device_sort_key(device: str) -> tuple:
    """Accelerators by kind and index ("cuda:2" before "cuda:10"), then cpu, disk, meta."""
    kind, _, index = device.partition(":")
    number = int(index) if index.isdigit() else -1
    if device in HOST_DEVICES:
        return (1, HOST_DEVICES.index(device), 0, device)
    rank = ACCELERATOR_ORDER.index(kind) if kind in ACCELERATOR_ORDER else len(ACCELERATOR_ORDER)
    return (0, rank, number, device)


def sort_devices(devices) -> list[str]:
    return sorted(devices, key=device_sort_key)


def accelerators(devices) -> list[str]:
    """The accelerators among `devices`, in display order."""
    return sort_devices(d for d in devices if is_accelerator(d))


# --------------------------------------------------------------------------- dtypes


def parse_dtype(value: Any, *, aliases: bool = True) -> Any:
    """A torch dtype, or "auto", from any accepted spelling; ValueError for anything else.

    Accepts a `torch.dtype`, "auto", "bfloat16", "torch.bfloat16", and (with `aliases`)
    "bf16", "fp16", "half", "fp32", "float", "fp64", "double".
    """
    import torch

    if isinstance(value, torch.dtype):
        return value
    if not isinstance(value, str):
        raise ValueError(_UNKNOWN_DTYPE.format(value=value))
    name = value.removeprefix("torch.")
    if name == "auto":
        return "auto"
    if aliases:
        name = DTYPE_ALIASES.get(name, name)
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(_UNKNOWN_DTYPE.format(value=value))
    return dtype


def dtype_name(dtype: Any) -> str:
    """torch.bfloat16 -> "bfloat16"."""
    return str(dtype).removeprefix("torch.")
