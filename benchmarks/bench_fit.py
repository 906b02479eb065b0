"""`%llmfit` benchmark: speed and real memory on a 70B config, accuracy against real generate calls.

Run on demand (not a test), in each environment:

    python benchmarks/bench_fit.py [speed] [accuracy] [story] [rss] [gpu]

1. speed: Llama-70B's published shape (hidden 8192, 80 layers, 64 heads, 8 KV heads,
   intermediate 28672, vocab 128256, bf16) built on the meta device; the longest prompt that fits
   a budget at 8,192 tokens of context (the search included), sdpa and eager. Wall time, fake
   generate runs, the growth of peak RSS and the real bytes the cpu allocator handed out.
2. accuracy: small real models (llama, mistral with a sliding window, gemma2, qwen2 with its
   window on), eager and sdpa, prompts of 128 to 4,096 tokens, batch 1 and 4: the predicted peak
   above the weights vs the measured peak of the real `generate` call, read from the cpu
   allocator's events (torch.profiler), independent of the prediction.
3. story: 120 prompts where item 100 is 8x longer, a budget that fits the short ones: what
   `%llmfit` says in a real IPython shell, and item 100's predicted vs measured peak.
4. rss: the same comparison by peak RSS of a fresh interpreter per call, glibc told to return
   large blocks at once (MALLOC_MMAP_THRESHOLD_=65536).
5. gpu: predicted vs `torch.cuda.max_memory_allocated()`, and the longest prompt vs where a real
   OOM starts under `set_per_process_memory_fraction`; skipped without CUDA.
Prints markdown tables.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

LLAMA_70B = dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                 intermediate_size=28672, vocab_size=128256, max_position_embeddings=8192)
SMALL = dict(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=8192)
MIB = 1 << 20


def small_model(arch: str, attention: str):
    import torch
    from support.realpeak import no_eos
    from transformers import AutoConfig, AutoModelForCausalLM

    extra = {"mistral": dict(sliding_window=512), "gemma2": dict(sliding_window=512, head_dim=64, query_pre_attn_scalar=64),
             "qwen2": dict(use_sliding_window=True, sliding_window=512, max_window_layers=2)}.get(arch, {})
    torch.manual_seed(0)
    config = AutoConfig.for_model(arch, **SMALL, **extra)
    return no_eos(AutoModelForCausalLM.from_config(config, attn_implementation=attention).eval())


def speed() -> None:
    import torch
    from support.realpeak import profiled_peak
    from transformers import AutoConfig, AutoModelForCausalLM

    from llm_magic.predict.gen_layout import layout_of_meta
    from llm_magic.predict.generation import GenerationPredictor

    print("| attention | budget on cuda:0 | longest prompt (256 new) | fake runs | wall time (cold, warm) "
          "| peak RSS growth | real bytes from the cpu allocator |")
    print("|---|---|---|---|---|---|---|")
    for attention in ("sdpa", "eager"):
        config = AutoConfig.for_model("llama", **LLAMA_70B)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation=attention)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        for budget_gib in (140, 135):
            result = {}

            def predict():
                started = time.perf_counter()
                predictor = GenerationPredictor(layout_of_meta(model, {"": "cuda:0"}))
                limit = predictor.largest_prompt(1, 256, {"cuda:0": (budget_gib << 30) - weights})
                result.setdefault("seconds", []).append(time.perf_counter() - started)
                result.update(limit=limit, runs=predictor.simulator.runs)

            rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            predict()
            growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) * 1024
            predict()
            real = profiled_peak(predict)
            cold, warm = result["seconds"][:2]
            print(f"| {attention} | {budget_gib} GiB (weights {weights / (1 << 30):.1f} GiB) | "
                  f"{result['limit'].max_prompt_tokens:,} | {result['runs']} | {cold:.2f} s, {warm:.2f} s | "
                  f"{growth / MIB:.1f} MiB | {real / MIB:.2f} MiB |", flush=True)


ACCURACY = [(arch, attention) for arch in ("llama", "mistral", "gemma2", "qwen2") for attention in ("eager", "sdpa")]
SHAPES = [(1, 128), (1, 1024), (1, 4096), (4, 128), (4, 1024), (4, 2048)]


def accuracy(new_tokens: int = 8) -> None:
    from support.realpeak import generate_peak

    from llm_magic.predict.generation import GenerationPredictor

    print("| model | attention | batch | prompt | predicted | measured | predicted - measured | error |")
    print("|---|---|---|---|---|---|---|---|")
    worst = []
    for arch, attention in ACCURACY:
        try:
            model = small_model(arch, attention)
        except (ValueError, ImportError) as error:  # gemma2 has no sdpa in transformers 5
            print(f"| {arch} | {attention} | | | not supported: {str(error).splitlines()[0][:60]} | | | |")
            continue
        predictor = GenerationPredictor.for_model(model)
        for batch, tokens in SHAPES:
            if attention == "eager" and batch * tokens > 8192:
                continue  # batch x heads x T x T float32 scores: more RAM than this shared machine has
            predicted = predictor.peaks(batch, tokens, new_tokens)["cpu"]
            measured = generate_peak(model, batch, tokens, new_tokens)
            error = (predicted - measured) / measured
            worst.append(error)
            print(f"| {arch} | {attention} | {batch} | {tokens:,} | {predicted / MIB:.2f} MiB | {measured / MIB:.2f} MiB | "
                  f"{predicted - measured:+,} B | {error:+.3%} |", flush=True)
    print(f"\n{len(worst)} rows; error from {min(worst):+.3%} to {max(worst):+.3%}")


def story(short: int = 256, new_tokens: int = 16) -> None:
    from IPython.core.interactiveshell import InteractiveShell
    from support.realpeak import generate_peak

    from llm_magic.predict.generation import GenerationPredictor

    model = small_model("llama", "eager")
    predictor = GenerationPredictor.for_model(model)
    weights = predictor.layout.weights_by_device["cpu"]
    long = 8 * short
    room = (predictor.peaks(1, short, new_tokens)["cpu"] + predictor.peaks(1, long, new_tokens)["cpu"]) // 2
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "llm_magic")
    shell.user_ns.update(model=model, prompts=[[5] * (long if i == 100 else short) for i in range(120)])
    started = time.perf_counter()
    report = shell.run_line_magic("llmfit", f"model --prompts prompts --max-new-tokens {new_tokens} "
                                            f"--budget cpu={weights + room}B -o")
    seconds = time.perf_counter() - started
    print(f"120 prompts of {short} tokens, item 100 of {long}; budget {(weights + room) / MIB:.1f} MiB "
          f"({room / MIB:.1f} MiB above the weights); %llmfit took {seconds:.2f} s ({report.simulations} fake runs)")
    print(f"- first failing item: {report.first_failing_item}; failing: {[item.index for item in report.failing]}")
    print(f"- {report.first_failing}")
    item = report.items[100]
    measured_long = generate_peak(model, 1, long, new_tokens)
    measured_short = generate_peak(model, 1, short, new_tokens)
    print(f"- item 100: predicted {(item.peak_bytes['cpu'] - weights) / MIB:.2f} MiB above the weights, "
          f"measured {measured_long / MIB:.2f} MiB (the budget leaves {room / MIB:.2f} MiB): the loop dies there")
    print(f"- a short item: predicted {predictor.peaks(1, short, new_tokens)['cpu'] / MIB:.2f} MiB, measured {measured_short / MIB:.2f} MiB")


RSS_CHILD = r"""
import json, os, sys, torch
sys.path.insert(0, sys.argv[1])
from benchmarks.bench_fit import small_model
arch, attention, batch, tokens = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
model = small_model(arch, attention)
ids = torch.full((batch, tokens), 5); mask = torch.ones(batch, tokens, dtype=torch.long)
model.generate(ids[:, :8], attention_mask=mask[:, :8], max_new_tokens=2, pad_token_id=3)  # warm
def status(key):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
before = status("VmRSS:")
model.generate(ids, attention_mask=mask, max_new_tokens=8, pad_token_id=3)
print(json.dumps({"growth": status("VmHWM:") - before}))
"""


def rss() -> None:
    from llm_magic.predict.generation import GenerationPredictor

    root = str(Path(__file__).resolve().parents[1])
    print("| model | attention | batch | prompt | predicted | peak RSS growth | error |")
    print("|---|---|---|---|---|---|---|")
    for arch, attention, batch, tokens in [("llama", "eager", 1, 2048), ("llama", "sdpa", 4, 2048),
                                           ("mistral", "sdpa", 4, 4096), ("gemma2", "eager", 1, 2048)]:
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", PYTHONPATH=root + "/tests")
        out = subprocess.run([sys.executable, "-c", RSS_CHILD, root, arch, attention, str(batch), str(tokens)],
                             env=env, capture_output=True, text=True, check=True).stdout
        growth = json.loads(out.strip().splitlines()[-1])["growth"]
        predicted = GenerationPredictor.for_model(small_model(arch, attention)).peaks(batch, tokens, 8)["cpu"]
        print(f"| {arch} | {attention} | {batch} | {tokens:,} | {predicted / MIB:.1f} MiB | {growth / MIB:.1f} MiB | "
              f"{(predicted - growth) / growth:+.1%} |", flush=True)


def gpu() -> None:
    """Not run on this machine (no CUDA): predicted vs torch.cuda.max_memory_allocated()."""
    import torch

    if not torch.cuda.is_available():
        print("gpu: not run (no CUDA device)")
        return
    from llm_magic.predict.generation import GenerationPredictor

    print("| model | attention | batch | prompt | predicted | max_memory_allocated | error |")
    print("|---|---|---|---|---|---|---|")
    for arch, attention in ACCURACY:
        model = small_model(arch, attention).to("cuda", torch.bfloat16)
        predictor = GenerationPredictor.for_model(model)
        for batch, tokens in SHAPES:
            ids = torch.full((batch, tokens), 5, device="cuda")
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, pad_token_id=3)
            measured = torch.cuda.max_memory_allocated() - base
            predicted = predictor.peaks(batch, tokens, 8)["cuda:0"]
            print(f"| {arch} | {attention} | {batch} | {tokens:,} | {predicted / MIB:.1f} MiB | {measured / MIB:.1f} MiB | "
                  f"{(predicted - measured) / measured:+.1%} |", flush=True)
    # The longest prompt vs where a real OOM starts, under a memory fraction.
    model = small_model("llama", "eager").to("cuda", torch.bfloat16)
    predictor = GenerationPredictor.for_model(model)
    total = torch.cuda.get_device_properties(0).total_memory
    cap = torch.cuda.memory_allocated() + 2 * (1 << 30)
    torch.cuda.set_per_process_memory_fraction(cap / total)
    limit = predictor.largest_prompt(1, 8, {"cuda:0": cap - torch.cuda.memory_allocated()})
    tokens, step = limit.max_prompt_tokens, max(1, limit.max_prompt_tokens // 100)
    while True:
        try:
            ids = torch.full((1, tokens), 5, device="cuda")
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, pad_token_id=3)
        except torch.OutOfMemoryError:
            break
        tokens += step
    print(f"\nlongest prompt predicted {limit.max_prompt_tokens:,}; first real OOM near {tokens:,} tokens")


if __name__ == "__main__":
    import torch
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {os.cpu_count()} cpus, "
          f"{torch.get_num_threads()} torch threads")
    chosen = sys.argv[1:] or ["speed", "accuracy", "story", "rss", "gpu"]
    for name in chosen:
        print(f"\n## {name}\n")
        globals()[name]()
