"""Pre-flight benchmark: speed and memory on a 70B config, accuracy on real tiny loads.

Run on demand (not a test), in each environment:

    python benchmarks/bench_preflight.py

1. Cold start: the 70B pre-flight in fresh interpreters (nothing imported), median of several
   runs, split into the imports any `from_pretrained` of that model pays anyway (torch,
   transformers' Auto classes and the model's modeling module) and what the pre-flight adds;
   with the largest imports listed (`-X importtime`).
2. Llama-70B's published shape (hidden 8192, 80 layers, 64 heads, 8 KV heads, intermediate
   28672, vocab 128256), config only: time of a first and a warm `predict` in one process, and the
   growth of the process's peak RSS (141 GB of bf16 weights would show; the meta device allocates none).
3. Tiny checkpoints of several architectures, loaded for real: predicted vs loaded bytes, and
   predicted vs real `hf_device_map` under a `max_memory` that forces a cpu/disk split.
Prints markdown tables. `--cold-only` runs part 1 alone.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# tests/support holds the tiny-model builder the benchmarks share with the tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

LLAMA_70B = dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                 intermediate_size=28672, vocab_size=128256)
GIB = 1 << 30


def peak_rss() -> int:
    """Peak resident set size of this process, bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# Run in a fresh interpreter: the pre-flight of the 70B config, nothing imported before. With
# PRELOAD, first what the load itself imports (its cost is timed apart).
COLD = """
import json, os, sys, time
started = time.perf_counter()
if {preload}:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained({folder!r})
    AutoModelForCausalLM._model_mapping[type(config)]  # imports the modeling module
loaded = time.perf_counter()
from llm_magic.predict.calls import load_call
from llm_magic.predict.preflight import predict
prediction = predict(load_call({folder!r}, device_map="auto"), {{"cuda:0": 80 << 30, "cpu": 120 << 30}})
done = time.perf_counter()
assert prediction.status == "ok", prediction.notes
print(json.dumps({{"load_imports": loaded - started, "preflight": done - loaded}}))
"""


def fresh(code: str, *flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *flags, "-c", code], capture_output=True, text=True, env=env, check=True)


def bench_cold(folder: str, runs: int = 5) -> tuple[list[list[str]], list[tuple[str, float]]]:
    """Rows: cold pre-flight alone, and after the load's own imports (median of `runs` each);
    plus the largest top-level imports of a cold pre-flight."""
    rows = []
    for label, preload in (("pre-flight first, nothing imported", False),
                           ("after the imports the load itself needs", True)):
        figures = [json.loads(fresh(COLD.format(folder=folder, preload=preload)).stdout.strip().splitlines()[-1])
                   for _ in range(runs)]
        imports = statistics.median(f["load_imports"] for f in figures)
        own = statistics.median(f["preflight"] for f in figures)
        total = statistics.median(f["load_imports"] + f["preflight"] for f in figures)
        spread = ", ".join(f"{f['load_imports'] + f['preflight']:.2f}" for f in figures)
        rows.append([label, f"{total:.2f}", f"{imports:.2f}" if preload else "-", f"{own:.2f}", spread])
    trace = fresh(COLD.format(folder=folder, preload=False), "-X", "importtime").stderr
    top: dict[str, float] = {}
    for line in trace.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[1].strip().isdigit() and not parts[2].startswith("  "):
            top[parts[2].strip()] = int(parts[1]) / 1e6  # cumulative, top-level imports only
    return rows, sorted(top.items(), key=lambda item: -item[1])[:8]


def bench_70b(rows: list[list[str]]) -> None:
    from llm_magic.predict.calls import load_call
    from llm_magic.predict.preflight import predict

    folder = llama_70b_folder()
    scenarios = [
        ("cpu only, 64 GiB free", {"cpu": 64 * GIB}, {}),
        ("H100 80 GiB + 120 GiB cpu", {"cuda:0": 80 * GIB, "cpu": 120 * GIB}, {}),
        ("H100 80 GiB + 120 GiB cpu, dtype=bf16", {"cuda:0": 80 * GIB, "cpu": 120 * GIB}, {"dtype": "bfloat16"}),
        ("H200 141 GiB + 120 GiB cpu", {"cuda:0": 141 * GIB, "cpu": 120 * GIB}, {}),
    ]
    for name, free, extra in scenarios:
        call = load_call(folder, device_map="auto", **extra)
        gc.collect()
        before = peak_rss()
        started = time.perf_counter()
        prediction = predict(call, free)
        cold = time.perf_counter() - started
        growth = peak_rss() - before
        warm = []
        for _ in range(3):
            started = time.perf_counter()
            predict(call, free)
            warm.append(time.perf_counter() - started)
        by_device = ", ".join(f"{d} {b / GIB:.1f}" for d, b in prediction.bytes_by_device.items())
        missing = "-" if not prediction.missing_bytes else f"{prediction.missing_bytes / GIB:.1f} GiB"
        rows.append([name, prediction.dtype, f"{prediction.total_bytes / GIB:.2f}", by_device, missing,
                     f"{cold:.2f}", f"{statistics.median(warm):.2f}", f"{growth / (1 << 20):.0f}"])


def real_load(path: str, **kwargs):
    from transformers import AutoModelForCausalLM

    from llm_magic.names import normalize_device_map

    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    device_map = getattr(model, "hf_device_map", None)
    total = sum(t.numel() * t.element_size() for _, t in model.named_parameters())
    total += sum(t.numel() * t.element_size() for _, t in model.named_buffers())
    del model
    gc.collect()
    return (normalize_device_map(device_map) if device_map else None), total


def bench_tiny(rows: list[list[str]]) -> None:
    from support.tinymodels import build_tiny_model

    from llm_magic.predict.calls import load_call
    from llm_magic.predict.preflight import predict

    root = tempfile.mkdtemp(prefix="tiny-")
    plenty = {"cpu": 1 << 40}
    for arch in ("llama", "mistral", "gemma2", "deepseek_v3"):
        for saved, extra in (("float32", {}), ("bfloat16", {}), ("bfloat16", {"dtype": "bfloat16"})):
            path = str(build_tiny_model(os.path.join(root, f"{arch}-{saved}"), arch, dtype=saved,
                                        with_tokenizer=False))
            prediction = predict(load_call(path, device_map="auto", **extra), plenty)
            _, real_bytes = real_load(path, device_map="auto", **extra)
            error = abs(prediction.total_bytes - real_bytes) / real_bytes * 100
            # A split: 60% of the model's bytes for the cpu, the rest to disk.
            split = dict(device_map="auto", max_memory={"cpu": int(prediction.total_bytes * 0.6)},
                         offload_folder=os.path.join(root, "offload"), **extra)
            split_prediction = predict(load_call(path, **split), plenty)
            try:
                real_map, _ = real_load(path, **split)
                same = "yes" if real_map == split_prediction.device_map else "NO"
            except Exception as exc:  # noqa: BLE001 - shown in the table
                raised = "predicted" if split_prediction.will_raise else "NOT predicted"
                same = f"raised {type(exc).__name__} ({raised})"
            label = f"saved {saved}" + (", dtype=bf16" if extra else "")
            rows.append([arch, label, prediction.dtype, str(prediction.total_bytes), str(real_bytes),
                         f"{error:.3f}%", same])


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def llama_70b_folder() -> str:
    from transformers import AutoConfig

    folder = tempfile.mkdtemp(prefix="llama70b-")
    AutoConfig.for_model("llama", torch_dtype="bfloat16", architectures=["LlamaForCausalLM"],
                         **LLAMA_70B).save_pretrained(folder)
    return folder


def main() -> None:
    import platform

    import accelerate
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    print(f"{time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} cpus, load average "
          f"{os.getloadavg()[0]:.1f}; transformers {transformers.__version__}, accelerate {accelerate.__version__}, "
          f"torch {torch.__version__}, python {sys.version.split()[0]}\n")
    cold_rows, imports = bench_cold(llama_70b_folder())
    print("### Cold pre-flight of the 70B config (fresh interpreters, median of 5)\n")
    print(table(["run", "total s", "load's own imports s", "pre-flight s", "each run, total s"], cold_rows))
    print("\nLargest top-level imports of a cold pre-flight (cumulative s): "
          + ", ".join(f"{name} {seconds:.2f}" for name, seconds in imports))
    if "--cold-only" in sys.argv:
        return
    rows: list[list[str]] = []
    bench_70b(rows)
    print("\n### Llama-70B shape (config only, meta device, one process)\n")
    print(table(["budget", "dtype", "total GiB", "GiB per device", "missing on best device",
                 "first s", "warm s", "peak RSS growth MiB"], rows))
    rows = []
    bench_tiny(rows)
    print("\n### Tiny checkpoints loaded for real\n")
    print(table(["arch", "checkpoint / call", "load dtype", "predicted bytes", "loaded bytes", "error",
                 "60% cpu split: map == hf_device_map"], rows))


if __name__ == "__main__":
    main()
