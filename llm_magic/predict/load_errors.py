"""Errors `from_pretrained` will raise once it has a device map, told from the map and the files.

All are about disk offload: the loader needs an `offload_folder` for weights it must re-save
(a `.bin` checkpoint in 4.x and 5.x; in 5.x also weights a `WeightConverter` builds on load,
e.g. fused MoE experts, even from safetensors), and 4.57 fails outright when the whole model maps
to disk.
"""

from __future__ import annotations

import re

from llm_magic.compat import transformers as tf
from llm_magic.predict.replay import Replayed
from llm_magic.predict.request import Request
from llm_magic.predict.result import Draft
from llm_magic.predict.sizing import device_of


def check_disk_offload(request: Request, replayed: Replayed, version: tuple[int, int], draft: Draft) -> Draft:
    """The draft with the disk-offload errors the load will raise (or a note when it cannot tell)."""
    device_map = draft.device_map
    if device_map is None or "disk" not in device_map.values():
        return draft
    if not request.offload_folder_known:
        return draft.noted("offload_folder is computed by code: whether disk offload works is unknown")
    checkpoint = replayed.checkpoint
    fmt = checkpoint.format if checkpoint else None
    folder = request.offload_folder
    if folder is None and fmt == "bin":
        draft = draft.raising(
            "ValueError: modules map to disk and the checkpoint is not safetensors: from_pretrained asks for "
            "an offload_folder")
    if tf.whole_model_on_disk_fails(version) and set(device_map.values()) == {"disk"}:
        # Seen on 4.57.6: the loader hands "disk" to torch / safetensors as a device name.
        error = ("SafetensorError: device disk is invalid" if fmt == "safetensors"
                 else "RuntimeError: Expected one of cpu, cuda, ... device type at start of device string: disk")
        draft = draft.raising(f"{error} (transformers 4.57 fails when the whole model maps to disk)")
    if folder is None and fmt == "safetensors" and tf.offload_resaves_converted(version):
        converted = _converted_on_disk(replayed, device_map)
        if converted is None:
            draft = draft.noted("disk offload reads the safetensors in place; weights converted on load "
                                "(most MoE) would need an offload_folder: could not check")
        elif converted:
            draft = draft.raising(
                "ValueError: weights mapped to disk are converted on load (e.g. "
                f"{converted[0]}) and must be re-saved: from_pretrained asks for an offload_folder")
    return draft


def _converted_on_disk(replayed: Replayed, device_map) -> list[str] | None:
    """Disk-mapped parameters a WeightConverter builds from several checkpoint tensors, or None if unknown.

    (`core_model_loading.offload_and_maybe_resave_param` re-saves those.)
    """
    model, checkpoint = replayed.model, replayed.checkpoint
    try:
        conversions = tf.converted_weight_patterns(model)
    except Exception:  # noqa: BLE001 - CompatError, or the mapping helper failed on this model
        return None
    disk = [name for name in model.state_dict() if device_of(name, device_map) == "disk"]
    found: list[str] = []
    for source_patterns, target_patterns in conversions:
        sources = [re.compile(p.replace("*", ".*")) for p in source_patterns]
        if checkpoint.keys and not any(rx.search(k) for rx in sources for k in checkpoint.keys):
            continue  # the checkpoint already stores the converted form
        targets = [re.compile(p.replace("*", ".*")) for p in target_patterns]
        found.extend(name for name in disk if any(rx.search(name) for rx in targets))
    return found
