"""Guard-mode overhead on cells that load nothing: must be <= 1 ms median per cell.

Run on demand (not a test), in each environment:

    python benchmarks/bench_guard.py [--cells 2000] [--variables 10000]

A real InteractiveShell with the extension loaded (guard on, its default), ~10,000 user names
and a loaded tiny model. Measured, median and p90 over the same realistic cells (those of
notebooks/: imports, prints, `generate` calls, loops, a `%gpustate` line, a 200-line cell):

1. guard's `pre_run_cell` callback alone, on cells that load nothing (the cost every cell pays);
2. `run_cell` of a trivial cell with guard on and off, alternating blocks of 50 (what a user feels);
3. for scale: the callback on a cell that does load (reads the cell, releases the old model).
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
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
# Cells a notebook runs between loads: none of them loads a model.
CELLS = [
    "import torch, numpy as np",
    "print(model.config)",
    "out = model.generate(**inputs, max_new_tokens=32)\nprint(tokenizer.decode(out[0]))",
    "for i, batch in enumerate(loader):\n    loss = model(**batch).loss\n    loss.backward()\n    opt.step()",
    "%gpustate",
    "results = [len(x) for x in dataset]\nsum(results) / len(results)",
    "\n".join(f"value_{i} = compute({i}) + offset  # a long cell" for i in range(200)),
]


class Info:
    def __init__(self, raw_cell: str):
        self.raw_cell = raw_cell


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, default=2000)
    parser.add_argument("--variables", type=int, default=10_000)
    args = parser.parse_args(argv)

    import IPython
    import torch
    import transformers
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output
    from support.tinymodels import build_tiny_model

    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "llm_magic")
    path = str(build_tiny_model(Path(tempfile.mkdtemp()) / "model"))
    shell.user_ns.update({f"var_{i}": [i, str(i)] for i in range(args.variables)})
    shell.user_ns["path"] = path
    with capture_output():
        shell.run_cell("from transformers import AutoModelForCausalLM\nmodel = AutoModelForCausalLM.from_pretrained(path)")
    hook = shell._llm_magic_instance.guard_hooks.before

    callback = []
    for index in range(args.cells):
        info = Info(CELLS[index % len(CELLS)])
        start = time.perf_counter()
        hook._on_event(info)
        callback.append(time.perf_counter() - start)

    on, off = [], []
    with capture_output():
        for block in range(max(args.cells // 100, 4)):
            shell.run_line_magic("llmguard", "on" if block % 2 == 0 else "off")
            times = on if block % 2 == 0 else off
            for _ in range(50):
                start = time.perf_counter()
                shell.run_cell("x = 1")
                times.append(time.perf_counter() - start)
        shell.run_line_magic("llmguard", "on")

    loading = []
    with capture_output():
        for _ in range(10):
            start = time.perf_counter()
            hook._on_event(Info("model = AutoModelForCausalLM.from_pretrained(path)"))
            loading.append(time.perf_counter() - start)
            shell.run_cell("model = AutoModelForCausalLM.from_pretrained(path)")  # something to release next time

    print(f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, IPython {IPython.__version__}; {len(shell.user_ns):,} names in user_ns\n")
    print("| measured | median | p90 |")
    print("| --- | --- | --- |")
    print(f"| guard callback, cell loads nothing ({len(CELLS)} kinds, {len(callback)} cells) | "
          f"{statistics.median(callback) * MS:.4f} ms | {percentile(callback, 0.9) * MS:.4f} ms |")
    print(f"| run_cell('x = 1'), guard on | {statistics.median(on) * MS:.3f} ms | {percentile(on, 0.9) * MS:.3f} ms |")
    print(f"| run_cell('x = 1'), guard off | {statistics.median(off) * MS:.3f} ms | {percentile(off, 0.9) * MS:.3f} ms |")
    print(f"| guard callback, cell loads (reads it, releases the old tiny model) | "
          f"{statistics.median(loading) * MS:.1f} ms | {percentile(loading, 0.9) * MS:.1f} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
