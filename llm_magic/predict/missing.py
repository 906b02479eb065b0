"""How many more bytes the best device needs so that nothing lands on a slower tier.

A bisection over the best device's budget between the model's total (necessary) and total +
largest layer (sufficient: the placement keeps that much room on its main device), each step a
rerun of the loader's placement helper. Reported in the units the user controls: free memory on
the device, or the `max_memory` entry when one was passed.
"""

from __future__ import annotations

import math
import warnings
from typing import Mapping

from llm_magic.compat import transformers as tf
from llm_magic.compat.accelerate import file_size
from llm_magic.names import accelerate_key, accelerators, normalize_device, tier_rank
from llm_magic.predict.budget import transformers_budget
from llm_magic.predict.device_map import helper_budget, run_helper
from llm_magic.predict.replay import Replayed
from llm_magic.predict.request import Request
from llm_magic.predict.result import Context, Draft
from llm_magic.predict.sizing import largest_layer


def _resolution(total: int) -> int:
    """0.01% of the model (14 MB for a 70B in bf16; finer is noise next to allocator slack), at
    least 1 KiB: about 8 placement reruns whatever the size."""
    return max(1024, total // 10_000)


def find_missing(request: Request, replayed: Replayed, sizes: Mapping[str, int], context: Context,
                 draft: Draft) -> Draft:
    """The draft with `missing_bytes` (and what they add to) filled in, or a note saying why not."""
    best = context.best_device
    if not any(tier_rank(d) > tier_rank(best) for d in set(draft.device_map.values())):
        return draft.with_(missing_bytes=0)
    if len(accelerators(context.free)) > 1:
        return draft.noted("several accelerators: bytes missing to avoid offload not computed")
    budget = helper_budget(request, draft.budget)
    key = accelerate_key(best)
    total = sum(sizes.values())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the reruns repeat the first run's warnings
            needed = _least_budget(replayed, sizes, budget, key, best, total)
    except Exception as exc:  # noqa: BLE001 - CompatError included: the figure is then unknown
        return draft.noted(f"bytes missing to avoid offload: search failed ({exc})")
    if needed is None:
        return draft.noted("bytes missing to avoid offload: no budget found (unknown)")
    if request.max_memory is not None:
        current = file_size(budget.get(key, budget.get(best, 0)))
        return draft.with_(missing_bytes=max(0, math.ceil(needed - current)), missing_bytes_of=f"max_memory[{key!r}]")
    needed_free = _free_for_budget(context, best, needed, replayed.device_map == "sequential")
    return draft.with_(missing_bytes=max(0, needed_free - context.free[best]),
                       missing_bytes_of=f"free memory on {best}")


def _least_budget(replayed: Replayed, sizes, budget: dict, key, best: str, total: int) -> float | None:
    """The least budget on the best device with which the helper keeps every module on its tier."""

    def fits(best_budget: float) -> bool:
        raw = run_helper(replayed, {**budget, key: best_budget})
        return all(tier_rank(normalize_device(d)) <= tier_rank(best) for d in raw.values())

    no_split = tf.no_split_modules(replayed.model)
    high = float(total + largest_layer(replayed.model, sizes, no_split))
    low = float(max(total - 1, 0))
    for _ in range(8):  # the bound above should fit at once; doubling guards the unexpected
        if fits(high):
            break
        high *= 2
    else:
        return None
    while high - low > _resolution(total):
        middle = (low + high) / 2
        if fits(middle):
            high = middle
        else:
            low = middle
    return high


def _free_for_budget(context: Context, device: str, budget: float, sequential: bool) -> int:
    """The least free memory on `device` whose budget (`transformers_budget`) reaches `budget`."""

    def budget_of(free: int) -> float:
        figures = {**context.free, device: free}
        return transformers_budget(figures, cached_unused=context.cached_unused, version=context.version,
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
