"""A checkpoint as it lies on disk: its config and its weight files, read without loading a weight.

`from_pretrained` looks in a local directory or the HF cache; so does this module, offline
(never downloads). The config is parsed the way `from_pretrained` parses it; the weights are
described from the safetensors headers (the first 8 bytes give the header length, the JSON
header gives every tensor's dtype and byte range) or, for `.bin` pickles, which hold no cheap
index of their tensors, from the file sizes.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from typing import Any, Mapping

# safetensors dtype names of floating tensors, and the torch names of those torch has.
SAFETENSORS_FLOATS = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4")
SAFETENSORS_TO_TORCH = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}


@dataclass(frozen=True)
class Checkpoint:
    """The weight files `from_pretrained` would read, described from their headers only."""

    files: tuple[str, ...]
    format: str  # "safetensors" | "bin" | "none"
    sharded: bool
    tensor_bytes: int | None  # bytes of the stored tensors (safetensors: exact; .bin: file sizes)
    exact: bool  # tensor_bytes read from headers (True) or estimated from file sizes / index (False)
    stored_dtypes: tuple[str, ...]  # distinct dtypes in the headers ("BF16", "F32", ...), safetensors only
    first_float_dtype: str | None  # what `dtype="auto"` falls back to when the config has no dtype
    index_dtype: str | None  # `metadata.dtype` of a sharded index, which "auto" prefers
    missing_files: tuple[str, ...] = ()  # shards the index names that are not on disk
    notes: tuple[str, ...] = ()
    keys: tuple[str, ...] = field(default=(), repr=False)  # tensor names, when the headers were read

    @property
    def stored_float_dtype(self) -> str | None:
        """The torch name of the one float dtype the headers show ("bfloat16"); None if not exactly one."""
        floats = [d for d in self.stored_dtypes if d in SAFETENSORS_FLOATS]
        return SAFETENSORS_TO_TORCH.get(floats[0]) if len(floats) == 1 else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "files": list(self.files),
            "format": self.format,
            "sharded": self.sharded,
            "tensor_bytes": self.tensor_bytes,
            "exact": self.exact,
            "stored_dtypes": list(self.stored_dtypes),
            "first_float_dtype": self.first_float_dtype,
            "index_dtype": self.index_dtype,
            "missing_files": list(self.missing_files),
            "notes": list(self.notes),
            "tensor_count": len(self.keys),
        }


def read_config(
    model_id: str,
    trust_remote_code: bool = False,
    *,
    revision: str | None = None,
    subfolder: str = "",
    cache_dir: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    config_class: Any = None,
):
    """The model's config from a local directory or the HF cache (offline), no weights read.

    `overrides` are the extra `from_pretrained` keywords: both versions hand them to the config's
    `from_pretrained(..., return_unused_kwargs=True)`, which sets those that are config attributes.
    """
    if config_class is None:
        from transformers import AutoConfig as config_class
    kwargs: dict[str, Any] = {"local_files_only": True, "subfolder": subfolder or ""}
    if revision is not None:
        kwargs["revision"] = revision
    if cache_dir is not None:
        kwargs["cache_dir"] = cache_dir
    if getattr(config_class, "__name__", "") == "AutoConfig":
        kwargs["trust_remote_code"] = trust_remote_code
    config, _unused = config_class.from_pretrained(
        model_id, return_unused_kwargs=True, **kwargs, **dict(overrides or {})
    )
    return config


def read_checkpoint(
    model_id: str,
    *,
    revision: str | None = None,
    subfolder: str = "",
    cache_dir: str | None = None,
    variant: str | None = None,
    use_safetensors: bool | None = None,
) -> Checkpoint:
    """Find the weight files in the order `_get_resolved_checkpoint_files` tries them, and size them."""
    from transformers.utils import (
        SAFE_WEIGHTS_INDEX_NAME,
        SAFE_WEIGHTS_NAME,
        WEIGHTS_INDEX_NAME,
        WEIGHTS_NAME,
    )

    where = dict(subfolder=subfolder, revision=revision, cache_dir=cache_dir)
    candidates = []
    if use_safetensors is not False:
        candidates += [(SAFE_WEIGHTS_NAME, "safetensors", False), (SAFE_WEIGHTS_INDEX_NAME, "safetensors", True)]
    if not use_safetensors:
        candidates += [(WEIGHTS_NAME, "bin", False), (WEIGHTS_INDEX_NAME, "bin", True)]
    for name, fmt, sharded in candidates:
        path = locate(model_id, _add_variant(name, variant), **where)
        if path is None:
            continue
        if not sharded:
            return _size_files([path], fmt, sharded=False, index=None)
        with open(path, encoding="utf-8") as handle:
            index = json.load(handle)
        shards = sorted(set(index.get("weight_map", {}).values()))
        folder = os.path.dirname(path)
        files, missing = [], []
        for shard in shards:
            shard_path = os.path.join(folder, shard)
            if not os.path.isfile(shard_path):
                shard_path = locate(model_id, shard, **where)
            (files if shard_path else missing).append(shard_path or shard)
        return _size_files(files, fmt, sharded=True, index=index, missing=missing)
    return Checkpoint((), "none", False, None, False, (), None, None,
                      notes=("no weight files found locally (local directory or HF cache)",))


def locate(model_id: str, filename: str, *, subfolder: str = "", revision: str | None = None,
           cache_dir: str | None = None) -> str | None:
    """Path of `filename` in a local directory or the HF cache, or None; never downloads."""
    if os.path.isdir(model_id):
        path = os.path.join(model_id, subfolder or "", filename)
        return path if os.path.isfile(path) else None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    name = f"{subfolder}/{filename}" if subfolder else filename
    try:
        found = try_to_load_from_cache(model_id, name, cache_dir=cache_dir, revision=revision)
    except Exception:  # a malformed repo id: the same call would fail in from_pretrained
        return None
    return found if isinstance(found, str) else None


def read_safetensors_header(path: str) -> dict[str, Any]:
    """The JSON header of a safetensors file: first 8 bytes little-endian length, then the JSON."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        if length > 100_000_000:  # a corrupt length would make us read the whole file
            raise ValueError(f"{path}: implausible safetensors header length {length}")
        return json.loads(handle.read(length))


def _add_variant(name: str, variant: str | None) -> str:
    if not variant:
        return name
    stem, ext = name.rsplit(".", 1)
    return f"{stem}.{variant}.{ext}"


def _size_files(files, fmt, *, sharded, index, missing=()) -> Checkpoint:
    notes: list[str] = []
    metadata = (index or {}).get("metadata", {}) or {}
    index_dtype = metadata.get("dtype")
    if missing:
        total = metadata.get("total_size")
        notes.append(f"{len(missing)} shard(s) not on disk: size from the index's metadata.total_size")
        return Checkpoint(tuple(files), fmt, sharded, int(total) if total is not None else None, False,
                          (), None, index_dtype, tuple(missing), tuple(notes))
    if fmt == "bin":
        total = sum(os.path.getsize(f) for f in files)
        notes.append(".bin sizes are file sizes (pickle overhead included)")
        return Checkpoint(tuple(files), fmt, sharded, total, False, (), None, index_dtype, (), tuple(notes))
    total, dtypes, first_float, keys = 0, [], None, []
    for path in files:
        header = read_safetensors_header(path)
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            keys.append(name)
            begin, end = entry["data_offsets"]
            total += end - begin
            dtype = entry["dtype"]
            if dtype not in dtypes:
                dtypes.append(dtype)
            if first_float is None and dtype in SAFETENSORS_FLOATS:
                first_float = SAFETENSORS_TO_TORCH.get(dtype, dtype)
    return Checkpoint(tuple(files), fmt, sharded, total, True, tuple(dtypes), first_float, index_dtype,
                      (), tuple(notes), tuple(keys))
