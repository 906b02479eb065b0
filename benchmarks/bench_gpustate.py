"""How long `%gpustate` takes on a big notebook: 10,000 variables and 1,000,000 heap objects.

    python benchmarks/bench_gpustate.py [--repeat 30] [--write]

Target (issue #3): median <= 100 ms on CPU for the default snapshot. The gc-based search for
unnamed holders (`--deep`) scans every tracked object, so it is timed separately: it is an option
(and runs automatically only when CUDA reports allocations no holder explains).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

# tests/support holds the tiny-model builder the benchmarks share with the tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from busy_heap import NAMES  # noqa: E402 - benchmarks/ is on the path when run

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def build_shell(model_path: str):
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "llm_magic")
    shell.user_ns["_path"] = model_path
    shell.run_cell("from transformers import AutoModelForCausalLM\nmodel = AutoModelForCausalLM.from_pretrained(_path)")
    shell.run_cell("import torch\nopt = torch.optim.SGD(model.parameters(), lr=0.1)")
    shell.run_cell("model", store_history=True)
    shell.run_cell(NAMES)  # 10,000 user variables of mixed kinds
    return shell


def heap_ballast(count: int) -> list:
    """`count` gc-tracked objects that no user name reaches (a library's internal state)."""
    return [[i] for i in range(count)]


def time_calls(call, repeat: int) -> list[float]:
    call()  # warm-up: imports and caches
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def main() -> None:
    import gc

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--write", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args()

    from support.tinymodels import build_tiny_model

    from llm_magic.commands.gpustate import take_snapshot
    from llm_magic.ipython import shell_state

    model_path = str(build_tiny_model(Path(tempfile.mkdtemp()) / "model"))
    shell = build_shell(model_path)
    ballast = heap_ballast(1_000_000)
    tracked = len(gc.get_objects())

    def snapshot(deep: bool):
        return take_snapshot(shell_state.visible_names(shell), shell_state.hidden_refs(shell), deep=deep)

    default = time_calls(lambda: snapshot(False), args.repeat)
    deep = time_calls(lambda: snapshot(True), max(3, args.repeat // 5))
    del ballast

    import torch
    import transformers

    rows = [
        ("default snapshot (named + hidden holders)", default),
        ("--deep (adds the gc scan for unnamed holders)", deep),
    ]
    lines = [
        f"## %gpustate speed ({datetime.date.today()}, CPU: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores; Python {sys.version.split()[0]}, torch {torch.__version__}, "
        f"transformers {transformers.__version__})",
        "",
        f"Namespace: 10,000 variables + a model, its optimizer and an `Out` entry; heap: {tracked:,} gc-tracked objects.",
        "",
        "| snapshot | median ms | p90 ms | runs |",
        "| --- | ---: | ---: | ---: |",
    ]
    for label, samples in rows:
        p90 = statistics.quantiles(samples, n=10)[-1] if len(samples) >= 10 else max(samples)
        lines.append(f"| {label} | {statistics.median(samples):.1f} | {p90:.1f} | {len(samples)} |")
    text = "\n".join(lines)
    print(text)
    if args.write:
        results = Path(__file__).with_name("RESULTS.md")
        with results.open("a") as handle:
            handle.write("\n" + text + "\n")
        print(f"appended to {results}")


if __name__ == "__main__":
    main()
