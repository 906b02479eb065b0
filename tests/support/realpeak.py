"""The measured peak of a real `generate` call on the cpu, independent of llm_magic's prediction.

`profiled_peak` reads the cpu allocator's own events (`torch.profiler` with profile_memory): the
most bytes live at once during the call, above what was live when it started. That is the
figure `torch.cuda.max_memory_allocated()` gives on a GPU. `rss_peak_in_subprocess` measures the
process instead (peak RSS of a fresh interpreter, glibc told to give large blocks back at once),
for the benchmarks.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable


def profiled_peak(run: Callable[[], Any], *, mapped_files: Iterable[str] = ()) -> int:
    """Most bytes the cpu allocator held at once during `run()`, above its level at the start.

    `mapped_files`: files read with `safetensors.safe_open` during the run (accelerate's disk
    offload). Each read maps the whole file, and PyTorch reports the mapping as an allocation of
    the file's size although it is file pages, not allocated memory (the process's RSS does not
    grow by it): those events, and their frees, are left out.
    """
    import os

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = sorted(
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.device_type().name == "CPU"
    )
    mapping_sizes = {os.path.getsize(path) for path in mapped_files}
    live = peak = 0
    for _, nbytes in events:
        if abs(nbytes) in mapping_sizes:
            continue
        live += nbytes
        peak = max(peak, live)
    return peak


def prompt(batch: int, tokens: int, *, padded: bool = False, token: int = 5):
    """Input ids and attention mask as a tokenizer with left padding gives them."""
    import torch

    input_ids = torch.full((batch, tokens), token, dtype=torch.long)
    mask = torch.ones(batch, tokens, dtype=torch.long)
    if padded and batch > 1:
        mask[-1, 0] = 0  # one row one token shorter, padded on the left
    return input_ids, mask


def generate_peak(model: Any, batch: int, tokens: int, new_tokens: int, *, padded: bool = False,
                  mapped_files: Iterable[str] = ()) -> int:
    """The measured peak of `model.generate` (bytes above the weights and inputs), exactly
    `new_tokens` steps: the model must not stop at an end-of-sequence token (see no_eos).
    `mapped_files`: see `profiled_peak`."""
    input_ids, mask = prompt(batch, tokens, padded=padded)
    pad = model.generation_config.pad_token_id
    return profiled_peak(lambda: model.generate(input_ids, attention_mask=mask, max_new_tokens=new_tokens,
                                                pad_token_id=3 if pad is None else pad),
                         mapped_files=mapped_files)


def no_eos(model: Any) -> Any:
    """Random tiny models may emit their end-of-sequence id at any step: generate exactly the
    tokens asked for (the prediction reads the same generation config)."""
    model.generation_config.eos_token_id = None
    model.config.eos_token_id = None
    return model
