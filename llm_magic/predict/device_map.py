"""The device map `from_pretrained` settles for the call's `device_map` value.

No `device_map`: the whole model on one device. A string like "auto": the same placement helper
`from_pretrained` calls, given the same budget it would compute (`budget.transformers_budget`
over the free memory after the release). A dict: taken as written. Anything else: the loader
raises, and so the prediction says.
"""

from __future__ import annotations

import warnings
from typing import Mapping

from llm_magic.compat import CompatError
from llm_magic.compat import transformers as tf
from llm_magic.names import accelerate_key, normalize_device, normalize_device_map
from llm_magic.predict.budget import transformers_budget
from llm_magic.predict.replay import Replayed
from llm_magic.predict.request import Request
from llm_magic.predict.result import Context, Draft, Unknown

# The strings `from_pretrained` treats as "compute a map" (both versions).
AUTO_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def settle_device_map(request: Request, replayed: Replayed, context: Context, draft: Draft) -> Draft:
    """The draft with `device_map` (and, for "auto" maps, `budget`) filled in; or Unknown."""
    import torch

    device_map = replayed.device_map
    if device_map is None:
        target = "cpu"
        if tf.follows_default_device(context.version):
            default = str(torch.get_default_device())
            if default != "cpu":
                target = normalize_device(default)
        return draft.with_(device_map={"": target}).noted(f"no device_map: the model loads wholly on {target}")
    if isinstance(device_map, str) and device_map in AUTO_MAPS:
        return _auto_map(request, replayed, context, draft)
    if isinstance(device_map, Mapping):
        return draft.with_(device_map=normalize_device_map(device_map)).noted(
            "device_map given explicitly: placement taken as written")
    if isinstance(device_map, (str, int, torch.device)):
        return draft.with_(device_map={"": normalize_device(device_map)})
    draft = draft.raising(f"ValueError: device_map {device_map!r} is not understood by from_pretrained")
    raise Unknown("device_map not understood", draft)


def helper_budget(request: Request, budget) -> dict:
    """The `max_memory` handed to the placement helper.

    A user max_memory goes as written, so that what the helper rejects ("cuda:0" keys in
    accelerate 1.15) is rejected here too; our own budget uses accelerate's ordinal keys.
    """
    if request.max_memory is not None:
        return dict(request.max_memory)
    return {accelerate_key(k): v for k, v in budget.max_memory.items()}


def run_helper(replayed: Replayed, max_memory: dict, device_map: str | None = None) -> dict:
    """One run of the loader's placement helper (raw map, accelerate's device names)."""
    return tf.auto_device_map(replayed.model, device_map or replayed.device_map, dict(max_memory),
                              replayed.hf_quantizer, replayed.dtype, replayed.keep_regex)


def _auto_map(request: Request, replayed: Replayed, context: Context, draft: Draft) -> Draft:
    budget = transformers_budget(free=context.free, max_memory=request.max_memory,
                                 cached_unused=context.cached_unused, version=context.version,
                                 sequential=replayed.device_map == "sequential")
    draft = draft.with_(budget=budget).noted(*budget.notes)
    if request.max_memory is None and "cpu" not in context.free:
        raise Unknown("free memory for cpu not given: the cpu budget is unknown", draft)
    unknown = [device for device, value in budget.max_memory.items() if value is None]
    if unknown:
        raise Unknown(f"free memory on {', '.join(unknown)} is not measured (CUDA not initialised in this "
                      "process, or none of its memory there): placement unknown", draft)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            raw = run_helper(replayed, helper_budget(request, budget))
    except CompatError as error:
        raise Unknown(f"placement unknown: {error}", draft) from None
    except Exception as exc:  # noqa: BLE001 - the real call would raise the same
        draft = draft.raising(f"{type(exc).__name__}: {exc}")
        raise Unknown("the placement helper raised: from_pretrained will fail the same way", draft) from None
    # accelerate's own warnings (e.g. offloaded buffers that fit no GPU) are worth passing on.
    draft = draft.noted(*dict.fromkeys(str(w.message) for w in caught))
    return draft.with_(device_map=normalize_device_map(raw))

