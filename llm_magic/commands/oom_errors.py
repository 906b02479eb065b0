"""Recognising an out-of-memory error, and reading the figures PyTorch put in its message.

Pure logic over exception objects; torch is never imported (an OOM from torch means torch is
already loaded).
"""

from __future__ import annotations

import dis
import re
from dataclasses import dataclass
from typing import Any

from llm_magic.engine.tensors import loaded_torch

# What PyTorch's allocators (and the libraries they call) write when they run out, at the
# start of the message or of one of its bracketed parts. Matched only on errors raised by
# native code: a user's `RuntimeError("cache ran out of memory")` is not an OOM.
_ALLOCATOR_MESSAGES = re.compile(
    r"(?:^|\] |\. )(?:CUDA|HIP|XPU|MPS backend|MLU|NPU) out of memory"
    r"|(?:^|\W)CUDA error: out of memory"
    r"|DefaultCPUAllocator: (?:can't allocate memory|not enough memory)"
    r"|CUBLAS_STATUS_ALLOC_FAILED|CUDNN_STATUS_ALLOC_FAILED",
)


def exception_chain(error: BaseException | None) -> list[BaseException]:
    """The error, then its causes and contexts (an OOM re-raised as another error counts)."""
    chain: list[BaseException] = []
    pending = [error]
    while pending:
        exc = pending.pop(0)
        if isinstance(exc, BaseException) and all(exc is not seen for seen in chain):
            chain.append(exc)
            pending += [exc.__cause__, exc.__context__]
    return chain


def _oom_types(torch: Any) -> tuple[type, ...]:
    # torch.OutOfMemoryError since 2.5 (torch.cuda.OutOfMemoryError is the same class there);
    # older torch has only the cuda one.
    found = [getattr(torch, "OutOfMemoryError", None), getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)]
    return tuple(kind for kind in found if isinstance(kind, type))


def error_message(error: BaseException) -> str:
    try:
        return str(error)
    except Exception:  # an exception whose __str__ fails still failed the cell
        return ""


def is_oom(error: BaseException) -> bool:
    """Is this exception itself a device out-of-memory error?

    `torch.OutOfMemoryError` (and its CUDA/XPU/MPS subclasses) by its real type; otherwise a
    RuntimeError that native code raised (PyTorch's allocators, cuBLAS) with an allocator's
    message. Judged by type() and by where it was raised, never by a substring alone.
    """
    torch = loaded_torch()
    if torch is None:
        return False  # no torch, no torch OOM: nothing of ours to explain
    kind = type(error)  # not error.__class__, which an object can fake
    if issubclass(kind, _oom_types(torch)):
        return True
    return (
        issubclass(kind, RuntimeError)
        and raised_by_native_code(error)
        and _ALLOCATOR_MESSAGES.search(error_message(error)) is not None
    )


def raised_by_native_code(error: BaseException) -> bool:
    """Did the innermost frame of the traceback call into C (torch) rather than `raise`?

    A Python `raise` (or re-raise) leaves the frame stopped on its raise instruction; an error
    from a C function leaves it on the call. A re-raise further up keeps the innermost entry.
    """
    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    try:
        for instruction in dis.get_instructions(tb.tb_frame.f_code):
            if instruction.offset == tb.tb_lasti:
                return not instruction.opname.startswith(("RAISE", "RERAISE"))
    except Exception:  # code objects we cannot disassemble: not provably native
        return False
    return False


def find_oom(error: BaseException | None) -> BaseException | None:
    """The OOM a failed cell died of: the error itself or one in its cause/context chain."""
    for exc in exception_chain(error):
        if is_oom(exc):
            return exc
    return None



_SIZE = r"([\d.]+)\s*(bytes|B|KiB|MiB|GiB|TiB|KB|MB|GB|TB)\b"
_UNITS = {"bytes": 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}
# PyTorch's MPS allocator writes KB/MB/GB for binary multiples, like its other allocators.
_UNITS.update({"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40})
_DEVICE_KINDS = {"cuda": "cuda", "xpu": "xpu", "mps": "mps", "mlu": "mlu", "hip": "cuda"}


@dataclass(frozen=True)
class OOMMessage:
    """Figures PyTorch put in its message, at the moment the allocation failed. None: not said."""

    device: str | None  # "cuda:0", "mps", ...
    requested_bytes: int | None
    total_bytes: int | None
    free_bytes: int | None  # driver free on the device, all processes
    allocated_bytes: int | None  # by PyTorch in this process
    reserved_unallocated_bytes: int | None  # PyTorch's cache: fragmentation when large

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _size(text: str, *patterns: str) -> int | None:
    """Bytes of the first pattern that matches (SIZE marks the figure); 0 is a figure too."""
    for pattern in patterns:
        match = re.search(pattern.replace("SIZE", _SIZE), text)
        if match is None:
            continue
        number, unit = match.group(match.lastindex - 1), match.group(match.lastindex)
        try:
            return int(float(number) * _UNITS[unit])
        except (ValueError, KeyError):
            continue
    return None


def _device(text: str) -> str | None:
    kind = re.match(r"\s*(?:\w+:\s*)?(CUDA|XPU|MPS|MLU|HIP)\b", text, re.IGNORECASE)
    name = _DEVICE_KINDS.get(kind.group(1).lower()) if kind else None
    # 2.1+: ". GPU 0 has a total capacity"; before: "(GPU 0; 7.79 GiB total capacity".
    index = re.search(r"(?:GPU|Device|MLU) (\d+)(?: has a total capacity|;)", text)
    if name == "mps":
        return "mps"
    if "DefaultCPUAllocator" in text:
        return "cpu"
    if index is not None:
        return f"{name or 'cuda'}:{index.group(1)}"
    return None


def parse_oom_message(text: str) -> OOMMessage:
    """Read PyTorch's OOM message (2.1+ wording, and the older one); missing figures are None."""
    reserved_total = _size(text, r"SIZE reserved in total by PyTorch")  # before 2.1
    allocated = _size(text, r"Of the allocated memory SIZE is allocated by PyTorch", r"SIZE already allocated")
    unallocated = _size(text, r"and SIZE is reserved by PyTorch but unallocated")
    if unallocated is None and reserved_total is not None and allocated is not None:
        unallocated = max(reserved_total - allocated, 0)
    return OOMMessage(
        device=_device(text),
        requested_bytes=_size(text, r"[Tt]ried to allocate SIZE"),
        total_bytes=_size(text, r"total capacity of SIZE", r"SIZE total capacity"),
        free_bytes=_size(text, r"of which SIZE ?is free", r"; SIZE free;"),
        allocated_bytes=allocated,
        reserved_unallocated_bytes=unallocated,
    )


def first_line(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error_message(error)}"
    return text.splitlines()[0][:300] if text else type(error).__name__
