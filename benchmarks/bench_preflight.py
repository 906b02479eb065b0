"""Pre-flight benchmark: speed and memory on a 70B config, accuracy on real tiny loads.

Run on demand (not a test), in each environment:

    python benchmarks/bench_preflight.py

1. Llama-70B's published shape (hidden 8192, 80 layers, 64 heads, 8 KV heads, intermediate
   28672, vocab 128256), config only: time of a cold and a warm `predict`, and the growth of the
   process's peak RSS (141 GB of bf16 weights would show; the meta device allocates none).
2. Tiny checkpoints of several architectures, loaded for real: predicted vs loaded bytes, and
   predicted vs real `hf_device_map` under a `max_memory` that forces a cpu/disk split.
Prints markdown tables.
"""

from __future__ import annotations

import gc
import os
import resource
import statistics
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


def bench_70b(rows: list[list[str]]) -> None:
    from transformers import AutoConfig

    from llm_magic.predict.calls import load_call
    from llm_magic.predict.preflight import predict

    folder = tempfile.mkdtemp(prefix="llama70b-")
    AutoConfig.for_model("llama", torch_dtype="bfloat16", architectures=["LlamaForCausalLM"],
                         **LLAMA_70B).save_pretrained(folder)
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


def main() -> None:
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, python {sys.version.split()[0]}, "
          f"{os.cpu_count()} cpus\n")
    rows: list[list[str]] = []
    bench_70b(rows)
    print("### Llama-70B shape (config only, meta device)\n")
    print(table(["budget", "dtype", "total GiB", "GiB per device", "missing on best device",
                 "cold s", "warm s", "peak RSS growth MiB"], rows))
    rows = []
    bench_tiny(rows)
    print("\n### Tiny checkpoints loaded for real\n")
    print(table(["arch", "checkpoint / call", "load dtype", "predicted bytes", "loaded bytes", "error",
                 "60% cpu split: map == hf_device_map"], rows))


if __name__ == "__main__":
    main()
