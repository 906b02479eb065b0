"""Watch-mode overhead per cell: `%llmwatch` must cost <= 5 ms median when no model changed.

Run on demand (not a test), in each environment:

    python benchmarks/bench_watch.py [--cells 400] [--variables 10000]

A real InteractiveShell, a namespace of ~10,000 user variables (ints, floats, strings, lists,
dicts, small objects with a `__dict__`, a few tensors) and a loaded tiny model. Measured:

1. `run_cell("x = 1")` with watch off and on, in alternating blocks of 25 cells so drift in
   the machine's speed hits both alike; the difference of the medians is the overhead a user
   feels.
2. The watcher's callback alone on the same cell (the part of (1) that is ours), median.
3. The same with every variable an object with a `__dict__` (the slowest per-name case).
4. For scale, the cells that do run the holder scan (watching "cpu" memory, as on a GPU machine
   it would watch the accelerator): a new output holding a tensor, and a model binding dropped
   while the model lives on (the scan then includes the gc search for unnamed copies).
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# tests/support holds the tiny-model builder the benchmarks share with the tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

MS = 1e3


class Box:
    """A small user object: has a `__dict__`, so the watcher reads it for a `.model`."""

    def __init__(self, value):
        self.value = value


def fill_namespace(shell, count: int, *, objects_only: bool = False) -> None:
    import torch

    makers = [
        lambda i: i,
        lambda i: i * 0.5,
        lambda i: f"text {i}",
        lambda i: [i, i + 1],
        lambda i: {"k": i},
        lambda i: Box(i),
        lambda i: (i, str(i)),
    ]
    for i in range(count):
        shell.user_ns[f"v{i}"] = Box(i) if objects_only else makers[i % len(makers)](i)
    for i in range(10):
        shell.user_ns[f"t{i}"] = torch.zeros(16)


def load_tiny_model(shell, folder: str) -> None:
    from support.tinymodels import build_tiny_model

    path = build_tiny_model(os.path.join(folder, "tiny"), "llama")
    shell.user_ns["_bench_path"] = str(path)
    shell.run_cell("from transformers import AutoModelForCausalLM\nmodel = AutoModelForCausalLM.from_pretrained(_bench_path)")


def fresh_shell():
    from IPython.core.interactiveshell import InteractiveShell

    InteractiveShell.clear_instance()
    shell = InteractiveShell.instance()
    shell.run_cell("import torch")
    return shell


def time_cell(shell, code: str) -> float:
    started = time.perf_counter()
    shell.run_cell(code, store_history=True)
    return time.perf_counter() - started


def interleaved(shell, watcher, cells: int, block: int = 25) -> tuple[list[float], list[float]]:
    """Per-cell seconds of run_cell('x = 1') with watch off and on, in alternating blocks.

    Blocks, not single cells: start() itself scans the namespace, and its allocations would
    bring garbage collections into the next timed cell.
    """
    off, on = [], []
    while len(on) < cells:
        watcher.stop()
        off += [time_cell(shell, "x = 1") for _ in range(block)]
        watcher.start()
        time_cell(shell, "x = 1")  # not timed: the first cell after start()
        on += [time_cell(shell, "x = 1") for _ in range(block)]
    watcher.stop()
    return off, on


def callback_alone(shell, watcher, cells: int) -> list[float]:
    """Seconds in the watcher's own callback after run_cell('x = 1')."""
    times = []
    watcher.start()
    callback = watcher._on_event

    def timed(result):
        started = time.perf_counter()
        callback(result)
        times.append(time.perf_counter() - started)

    # Swap in a timing wrapper for the registered callback, then restore it exactly.
    callbacks = shell.events.callbacks["post_run_cell"]
    index = callbacks.index(watcher._callback)
    callbacks[index] = timed
    try:
        for _ in range(cells):
            shell.run_cell("x = 1", store_history=True)
    finally:
        callbacks[index] = watcher._callback
        watcher.stop()
    return times


def costly_paths(shell, cells: int) -> dict[str, list[float]]:
    """Seconds of run_cell for the cells that do run the holder scan (watching "cpu" memory)."""
    from llm_magic.ipython.hooks import Watcher

    watcher = Watcher(shell, stale_device=lambda device: device == "cpu", show=lambda line: None)
    watcher.start()
    times: dict[str, list[float]] = {"new output holding a tensor": [], "model unbound, still alive": []}
    try:
        for index in range(cells):
            before = watcher.scans
            times["new output holding a tensor"].append(time_cell(shell, "torch.ones(300_000)"))
            # Rename the model back and forth: each cell drops a binding of a live model.
            rename = "alias = model\ndel model" if index % 2 == 0 else "model = alias\ndel alias"
            times["model unbound, still alive"].append(time_cell(shell, rename))
            assert watcher.scans == before + 2, "the scan did not run"
            shell.run_line_magic("reset", "-f out")
    finally:
        watcher.stop()
        if "alias" in shell.user_ns:
            shell.run_cell("model = alias\ndel alias")
    return times


def median_ms(values: list[float]) -> str:
    return f"{statistics.median(values) * MS:.3f}"


def p90_ms(values: list[float]) -> str:
    return f"{statistics.quantiles(values, n=10)[-1] * MS:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=400)
    parser.add_argument("--variables", type=int, default=10_000)
    args = parser.parse_args()

    import IPython
    import torch
    import transformers
    from IPython.utils.capture import capture_output

    from llm_magic.ipython.hooks import Watcher

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for label, objects_only in (("mixed types", False), ("all objects with __dict__", True)):
            shell = fresh_shell()
            fill_namespace(shell, args.variables, objects_only=objects_only)
            load_tiny_model(shell, folder)
            watcher = Watcher(shell, show=lambda line: None)
            for _ in range(20):  # warm up: type verdicts cached, history settled
                time_cell(shell, "x = 1")
            gc.collect()
            off, on = interleaved(shell, watcher, args.cells)
            alone = callback_alone(shell, watcher, args.cells)
            overhead = f"{(statistics.median(on) - statistics.median(off)) * MS:.3f}"
            rows.append((label, len(shell.user_ns), median_ms(off), median_ms(on), overhead, median_ms(alone), p90_ms(alone)))
            if not objects_only:
                with capture_output():  # the displayed tensors: not for the report
                    costly = costly_paths(shell, max(args.cells // 20, 10))
        gc.collect()

    print(f"python {sys.version.split()[0]}, IPython {IPython.__version__}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}; {args.cells} cells per figure, times in ms\n")
    print("| namespace | names | run_cell off | run_cell on | overhead (on - off) "
          "| callback alone, median | callback alone, p90 |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        print("| " + " | ".join(str(cell) for cell in row) + " |")
    print("\nCells that run the holder scan (mixed namespace, watching cpu memory), run_cell in ms:\n")
    print("| cell | scan | median | p90 | cells |")
    print("| --- | --- | ---: | ---: | ---: |")
    for label, times in costly.items():
        scan = "named + hidden + unnamed (gc)" if "model" in label else "named + hidden"
        print(f"| {label} | {scan} | {median_ms(times)} | {p90_ms(times)} | {len(times)} |")


if __name__ == "__main__":
    main()
