"""Predict what a `from_pretrained` call will do, before a byte of weights is read.

The prediction replays the first half of `from_pretrained` with the installed transformers, as
a chain of small steps over an immutable draft (`result.Draft`):

1. `request`: the call's arguments as values (an argument computed by code: unknown);
2. `replay`: the config, the weight files' headers, the quantizer, the class, the dtype, and
   the model built on the meta device (no memory);
3. `sizing`: bytes per tensor, as the load will hold them;
4. `device_map`: the map the loader settles, asking its own placement helper with the same
   budget it would compute (`budget.py`), given the free memory that will exist after the
   magic's release step;
5. `missing`: how many more bytes the best device needs to hold everything;
6. `load_errors`: the disk-offload errors the load will raise.

What cannot be known (an argument computed by code, a quantizer that cannot be prepared here, a
checkpoint that is not on disk, the free memory of a GPU CUDA has not measured, a private helper
of transformers that moved: `compat.CompatError`) makes the prediction "unknown" with a note that
says why; it is never filled in with a guess.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Iterator, Mapping

from llm_magic.compat import CompatError
from llm_magic.compat import transformers as tf
from llm_magic.predict.calls import LoadCall
from llm_magic.predict.device_map import AUTO_MAPS, settle_device_map
from llm_magic.predict.load_errors import check_disk_offload
from llm_magic.predict.missing import find_missing
from llm_magic.predict.replay import replay
from llm_magic.predict.request import read_request
from llm_magic.predict.result import Context, Draft, Prediction, Unknown, finish
from llm_magic.predict.sizing import bytes_by_device, modules_by_device, tensor_sizes

__all__ = ["Prediction", "predict"]


def predict(
    call: LoadCall,
    free: Mapping[str, int | None],
    *,
    cached_unused: Mapping[str, int] | None = None,
    find_missing: bool = True,
    generation_batch: int | None = None,
) -> Prediction:
    """Predict what `call` will do given `free` bytes per device ("cuda:0", "cpu") after release.

    `free` and `cached_unused` as `budget.free_after_release` gives them. A GPU whose free
    memory is None (not measured) still counts as the best device, but a `device_map="auto"`
    placement without `max_memory` is then "unknown"; a plain or explicit map is still predicted.
    Nothing is loaded: the model is built on the meta device. `find_missing` searches how many
    more bytes the best device needs to hold everything (a few more placement runs).
    `generation_batch`: also predict how far generation can go on the predicted placement (a
    fake-tensor `generate` of the meta model, at that batch): `Prediction.generation`.
    Never raises: every failure is an "unknown" prediction with a note.
    """
    started = time.perf_counter()
    context = Context(dict(free), cached_unused, tf.version(), tf.version_string(), find_missing, generation_batch)
    if call.kind != "model":
        skipped = Draft().noted(f"{call.class_name} loads a {call.kind}: nothing is placed on devices")
        return finish(skipped, "skipped", context, started)
    try:
        with _quiet():
            draft = _predict(call, context)
    except Unknown as unknown:
        return finish(unknown.draft.noted(unknown.reason), "unknown", context, started)
    return finish(draft, "ok" if draft.device_map is not None else "unknown", context, started)


def _predict(call: LoadCall, context: Context) -> Draft:
    """The steps in order. Whatever fails is Unknown with the draft as it stood: a CompatError
    says which private API moved; any other exception is a helper that changed shape."""
    draft = Draft()
    try:
        request, draft = read_request(call, draft)
        replayed, draft = replay(request, context.version, draft)
        sizes, draft = tensor_sizes(replayed, draft)
        draft = draft.with_(total_bytes=sum(sizes.values()))
        if replayed.pre_quantized and replayed.hf_quantizer is None and draft.checkpoint_bytes is not None:
            draft = draft.with_(total_bytes=draft.checkpoint_bytes).noted(
                "quantization_config in the config but not supported here: total from the checkpoint")
        draft = settle_device_map(request, replayed, context, draft)
        if context.find_missing and isinstance(replayed.device_map, str) and replayed.device_map in AUTO_MAPS:
            draft = find_missing(request, replayed, sizes, context, draft)
        by_device, uncovered = bytes_by_device(replayed.model, sizes, draft.device_map)
        draft = draft.with_(bytes_by_device=by_device,
                            modules_by_device=modules_by_device(replayed.model, sizes, draft.device_map))
        if uncovered:
            draft = draft.noted(f"{uncovered} bytes of weights are not covered by the device_map")
        draft = check_disk_offload(request, replayed, context.version, draft)
        return _with_generation(call, replayed, context, draft)
    except Unknown:
        raise
    except CompatError as error:
        raise Unknown(f"prediction unknown: {error}", draft) from None
    except Exception as exc:  # noqa: BLE001 - not a guess and not a crash of the user's cell
        raise Unknown(f"prediction failed ({type(exc).__name__}: {exc}): unknown", draft.with_(device_map=None)) from None


def _with_generation(call: LoadCall, replayed, context: Context, draft: Draft) -> Draft:
    """The generation headroom of the meta model on its predicted placement (dry runs only)."""
    if context.generation_batch is None or draft.device_map is None:
        return draft
    from llm_magic.predict.gen_headroom import fit_line_for_meta_model

    free = {device: nbytes for device, nbytes in context.free.items() if nbytes is not None}
    try:
        line = fit_line_for_meta_model(replayed.model, call.target or "model", draft.device_map, free,
                                       draft.bytes_by_device, batch=context.generation_batch)
    except Exception as error:  # noqa: BLE001 - an extra line: its failure is a note, the placement stands
        return draft.noted(f"generation headroom unknown ({type(error).__name__}: {error})"[:200])
    return draft.with_(generation=line)


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
