"""Seed reproduction: the same model reloaded three times in a notebook-like shell.

    python benchmarks/seed_reload.py [--rounds 3] [--write] [--verbose]

Each round runs the assignment cell through a real `InteractiveShell.run_cell`, in three modes:
a plain re-run with guard mode off (the old model is still bound to `model` while the new one is
built), the same cell under `%%llmload` (the old model is released first), and the plain cell with
the extension loaded as it is by default (guard mode releases the old model before the cell). After each round it measures where the model's
bytes are (llm_magic.measure.placement.model_placement: parameters, buffers and offload hooks, since
transformers 5 sets `hf_device_map` only for multi-device maps) and how long the cell took.

Memory is made scarce on purpose, so that the model fits once but not twice:
- GPU (torch.cuda.is_available()): a ballast CUDA tensor takes all but ~1.7 model sizes of free
  device memory. `device_map="auto"` budgets 90% of what is free on a single GPU.
- CPU: a ballast tensor takes all but ~1.7 model sizes of available RAM (psutil), which is what
  `device_map="auto"` budgets (transformers 5: 90% of it; 4.x: all of it), offloading the rest to
  disk. Two details make the CPU case behave like a GPU:
  * safetensors load zero-copy on CPU when no dtype conversion is needed: the weights stay in the
    page cache, which psutil counts as available, so a stale model would cost nothing. The
    checkpoint is saved in bfloat16 and loaded as float32, which makes a private copy, as copying
    to a GPU does.
  * glibc keeps freed large blocks inside the process (its mmap threshold grows after the first
    free), so RAM freed by releasing a model is not "available" again. `mallopt` pins the
    threshold so that freed tensors go back to the OS, as freed CUDA memory goes back to
    PyTorch's cache (which transformers counts as free).

Expected: the plain re-run lands on cpu/disk from round 2; `%%llmload` and the guarded plain cell
stay on the best device.
The ballast leaves little memory on purpose: run it on a quiet machine. Nothing is written into
the repository unless --write, which appends the table to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import os
import platform
import sys
import tempfile
import time
import weakref
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

# tests/support holds the tiny-model builder the benchmarks share with the tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
MiB = 1 << 20

# About 167 MiB on disk in bfloat16, 334 MiB loaded as float32: big enough that the model, not the
# allocator's noise, decides placement; small enough to build and load in seconds on two cores.
MODEL_SIZES = dict(
    hidden_size=1024, intermediate_size=2816, num_hidden_layers=6, vocab_size=8192,
    num_attention_heads=8, num_key_value_heads=4,
)
# Memory left free besides the ballast, in model sizes: >1.4 so the model fits once (the loader keeps
# 10% back, and room for the largest layer), <2 so that it does not fit next to a stale copy.
HEADROOM = 1.7
M_MMAP_THRESHOLD = -3  # glibc malloc.h
# The first line records what from_pretrained will see: under %%llmload, after the release.
PLAIN_CELL = (
    "free_at_load = measure_free()\n"
    'model = AutoModelForCausalLM.from_pretrained(path, device_map="auto", dtype=torch.float32, offload_folder=offload)'
)
LLMLOAD_CELL = (
    "%%llmload $path\n"
    "free_at_load = measure_free()\n"
    'model = AutoModelForCausalLM.from_pretrained(MODEL_NAME, device_map="auto", dtype=torch.float32, offload_folder=offload)'
)


@dataclass(frozen=True)
class Round:
    mode: str  # "plain re-run", "%%llmload" or "plain cell, extension loaded (guard)"
    number: int
    seconds: float
    free_before: int  # bytes free on the best device (GPU) or available RAM (CPU) before the cell
    free_at_load: int | None  # the same, as from_pretrained started (after %%llmload's release)
    bytes_by_device: dict[str, int]  # where the model's bytes are
    device_map_counts: dict[str, int] | None  # Counter(hf_device_map.values()); None: no map
    error: str | None = None


def return_freed_memory_to_os() -> bool:
    """Pin glibc's mmap threshold (1 MiB), so freed tensors leave the process (see docstring)."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 1 * MiB))
    except (OSError, AttributeError):
        return False  # not glibc: nothing to pin


def build_model(folder: Path) -> Path:
    from support.tinymodels import build_tiny_model

    return build_tiny_model(folder, "llama", dtype="bfloat16", **MODEL_SIZES)


def new_shell():
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "llm_magic")
    return shell


def loaded_bytes(model) -> int:
    from llm_magic.measure.placement import model_placement

    return model_placement(model, "model").total_bytes


def run_quietly(shell, cell: str, verbose: bool):
    from IPython.utils.capture import capture_output

    if verbose:
        return shell.run_cell(cell)
    with capture_output():
        return shell.run_cell(cell)


# --- memory: measuring it, and taking most of it away ------------------------------------------


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def free_bytes() -> int:
    """What device_map="auto" starts its budget from on the best device."""
    if on_gpu():
        import torch

        return torch.cuda.mem_get_info(0)[0]
    import psutil

    return psutil.virtual_memory().available


class Ballast:
    """Tensors holding everything but `keep_free` bytes of the best device's free memory.

    Held in chunks, so that an overshoot is corrected by dropping a small chunk, not by
    re-filling gigabytes.
    """

    CHUNK = 256 * MiB
    TOLERANCE = 16 * MiB

    def __init__(self, keep_free: int):
        self.keep_free = keep_free
        self.chunks: list = []

    def settle(self, attempts: int = 8) -> int:
        """Add or drop chunks until free memory is within TOLERANCE of the target; return it.

        Once is not enough on CPU: filling RAM evicts page cache, and the kernel's "available"
        estimate moves by more than what was allocated.
        """
        for _ in range(attempts):
            excess = free_bytes() - self.keep_free
            if abs(excess) <= self.TOLERANCE:
                break
            if excess > 0:
                self._grow(excess)
            elif self.chunks:
                self._shrink(-excess)  # overshot (or someone else allocated): give some back
            else:
                break  # less free than the target without any ballast: nothing to take
        return free_bytes()

    def _grow(self, size: int) -> None:
        while size > 0:
            chunk = min(size, self.CHUNK)
            self.chunks.append(self._allocate(chunk))
            size -= chunk

    def _shrink(self, size: int) -> None:
        while size > 0 and self.chunks:
            size -= self.chunks.pop().numel()
        gc.collect()

    @staticmethod
    def _allocate(size: int):
        import torch

        if on_gpu():
            return torch.empty(size, dtype=torch.uint8, device="cuda:0")  # committed at once
        # RAM is committed only when written: fill it, or "available" would not change.
        return torch.ones(size, dtype=torch.uint8)

    def release(self) -> None:
        self.chunks.clear()
        gc.collect()


def release_model(shell) -> None:
    """Free whatever `model` holds between modes (dispatched models are cyclic: gc needed)."""
    model = shell.user_ns.get("model")
    if model is None:
        return
    ref = weakref.ref(model)
    del model
    from IPython.utils.capture import capture_output

    with capture_output():
        shell.run_line_magic("llmfree", "--all")
    gc.collect()
    if on_gpu():
        import torch

        torch.cuda.empty_cache()
    if ref() is not None:
        raise RuntimeError("the model survived release; results would be meaningless")


# --- the rounds ------------------------------------------------------------------------------


def measure_round(shell, mode: str, number: int, cell: str, verbose: bool) -> Round:
    from llm_magic.measure.placement import model_placement

    before = free_bytes()
    start = time.perf_counter()
    result = run_quietly(shell, cell, verbose)
    seconds = time.perf_counter() - start
    error = result.error_before_exec or result.error_in_exec
    at_load = shell.user_ns.pop("free_at_load", None)
    model = shell.user_ns.get("model")
    if error is not None or model is None:
        message = f"{type(error).__name__}: {error}".splitlines()[0][:120]
        return Round(mode, number, seconds, before, at_load, {}, None, message)
    placement = model_placement(model, "model")
    device_map = getattr(model, "hf_device_map", None)
    counts = dict(Counter(str(v) for v in device_map.values())) if isinstance(device_map, dict) else None
    return Round(mode, number, seconds, before, at_load, {row.device: row.nbytes for row in placement.rows}, counts)


def run_mode(shell, mode: str, cell: str, rounds: int, verbose: bool, ballast: Ballast) -> list[Round]:
    ballast.settle()  # each mode starts from the same free memory
    results = []
    for number in range(1, rounds + 1):
        results.append(measure_round(shell, mode, number, cell, verbose))
        print(f"  {mode}, round {number}: {describe_placement(results[-1])} ({results[-1].seconds:.2f} s)", flush=True)
    release_model(shell)
    return results


# --- the report ----------------------------------------------------------------------------


def mib(nbytes: int) -> str:
    return f"{nbytes / MiB:,.0f} MiB"


def describe_placement(round_: Round) -> str:
    if round_.error:
        return f"failed: {round_.error}"
    total = sum(round_.bytes_by_device.values()) or 1
    return ", ".join(f"{device} {mib(n)} ({n / total:.0%})" for device, n in round_.bytes_by_device.items() if n)


def markdown_table(rounds: list[Round], free_label: str) -> str:
    lines = [
        f"| mode | round | cell time | {free_label}: before the cell | at from_pretrained | placement (bytes) | hf_device_map (modules per device) |",
        "| --- | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for r in rounds:
        counts = "—" if r.device_map_counts is None else ", ".join(f"{d}: {n}" for d, n in r.device_map_counts.items())
        at_load = "?" if r.free_at_load is None else mib(r.free_at_load)
        lines.append(
            f"| {r.mode} | {r.number} | {r.seconds:.2f} s | {mib(r.free_before)} | {at_load} | {describe_placement(r)} | {counts} |"
        )
    return "\n".join(lines)


def environment_line(model_bytes: int, keep_free: int) -> str:
    import torch
    import transformers

    device = f"GPU {torch.cuda.get_device_name(0)}" if on_gpu() else f"CPU ({os.cpu_count()} cores, {platform.machine()})"
    return (
        f"{datetime.date.today().isoformat()}, {device}; torch {torch.__version__}, transformers "
        f"{transformers.__version__}, Python {platform.python_version()}. Model: Llama-shaped, "
        f"{mib(model_bytes)} as float32; ballast leaves {mib(keep_free)} free ({keep_free / model_bytes:.1f} model sizes)."
    )


def append_results(table: str, environment: str) -> None:
    heading = "## Seed reproduction (GPU)" if on_gpu() else "## Seed reproduction (CPU)"
    section = f"\n{heading}\n\n{environment}\n\n{table}\n"
    with RESULTS.open("a", encoding="utf-8") as results:
        results.write(section)


# --- main ----------------------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="loads per mode (default: 3)")
    parser.add_argument("--headroom", type=float, default=HEADROOM, help=f"free memory left, in model sizes (default: {HEADROOM})")
    parser.add_argument("--write", action="store_true", help=f"append the table to {RESULTS.name}")
    parser.add_argument("--verbose", action="store_true", help="show the cells' output (llm_magic's reports, loader warnings)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    pinned = return_freed_memory_to_os()
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    if not args.verbose:
        transformers.utils.logging.set_verbosity_error()

    with tempfile.TemporaryDirectory(prefix="llm-magic-seed-") as scratch:
        scratch = Path(scratch)
        print("Building the model (random weights, no download)...", flush=True)
        path = build_model(scratch / "model")
        shell = new_shell()
        shell.user_ns.update(path=str(path), offload=str(scratch / "offload"), torch=torch, measure_free=free_bytes)
        shell.run_cell("from transformers import AutoModelForCausalLM")

        # Warm-up: one load and free pays the one-time costs (imports, caches) before sizing.
        run_quietly(shell, PLAIN_CELL, args.verbose)
        model_bytes = loaded_bytes(shell.user_ns["model"])
        release_model(shell)

        keep_free = int(args.headroom * model_bytes)
        print(f"Model: {mib(model_bytes)}. Taking all but {mib(keep_free)} of free memory"
              f"{'' if pinned or on_gpu() else ' (glibc mallopt unavailable: freed RAM may not count)'}...", flush=True)
        ballast = Ballast(keep_free)
        try:
            shell.run_line_magic("llmguard", "off")
            rounds = run_mode(shell, "plain re-run", PLAIN_CELL, args.rounds, args.verbose, ballast)
            rounds += run_mode(shell, "%%llmload", LLMLOAD_CELL, args.rounds, args.verbose, ballast)
            shell.run_line_magic("llmguard", "on")
            rounds += run_mode(shell, "plain cell, extension loaded (guard)", PLAIN_CELL, args.rounds, args.verbose, ballast)
        finally:
            ballast.release()

    table = markdown_table(rounds, "GPU free" if on_gpu() else "RAM available")
    environment = environment_line(model_bytes, keep_free)
    print(f"\n{environment}\n\n{table}")
    failed = [r for r in rounds if r.error]
    if failed:
        print(f"\n{len(failed)} round(s) failed: {failed[0].error}", file=sys.stderr)
    if args.write and failed:
        print(f"Not appended to {RESULTS.name}: a table with failed rounds is not a result.", file=sys.stderr)
    elif args.write:
        append_results(table, environment)
        print(f"\nAppended to {RESULTS}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
