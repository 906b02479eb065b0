"""KV cache headroom of real tiny models on CPU, against kvcache's arithmetic and the snapshot's memory."""

from __future__ import annotations

import json
import types

import pytest
import torch
from transformers import AutoModelForCausalLM

from llm_magic.compat.transformers import major as transformers_major
from llm_magic.measure.headroom import generation_headroom
from llm_magic.measure.kvcache import kv_cache_profile, tokens_that_fit
from llm_magic.measure.memory import (
    CUDA_MEASURED,
    CUDA_NOT_INITIALISED,
    DeviceMemory,
    MemorySnapshot,
    memory_snapshot,
)

MiB = 2**20
TRANSFORMERS_5 = transformers_major() >= 5
LAYERS = 4  # tinymodels' num_hidden_layers


def cpu_only(free: int) -> MemorySnapshot:
    return MemorySnapshot((DeviceMemory("cpu", "RAM", 64 << 30, free),), CUDA_NOT_INITIALISED, 0, "not queried")


def with_gpu(gpu_free: int, gpu_reserved_unused: int, cpu_free: int) -> MemorySnapshot:
    gpu = DeviceMemory("cuda:0", "GPU", 80 << 30, gpu_free, 0, gpu_reserved_unused)
    return MemorySnapshot((gpu, DeviceMemory("cpu", "RAM", 64 << 30, cpu_free)), CUDA_MEASURED, 1, "not installed")


def on_gpu_without_moving(layer, hook_type=None) -> None:
    """Give a layer accelerate's hook for execution on cuda:0, as dispatch_model does, without a GPU.

    The hook object is attached as an attribute (no init_hook, which would move the weights).
    """
    from accelerate.hooks import AlignDevicesHook, ModelHook, SequentialHook

    hook = AlignDevicesHook(execution_device=torch.device("cuda", 0))
    layer._hf_hook = SequentialHook(ModelHook(), hook) if hook_type == "sequential" else hook


@pytest.fixture(scope="module")
def llama(tiny_models):
    return AutoModelForCausalLM.from_pretrained(tiny_models())


def test_plain_cpu_model_against_kvcache_and_the_snapshot(llama):
    snapshot = memory_snapshot()
    headroom = generation_headroom(llama, "model", snapshot, batch=8)
    profile = kv_cache_profile(llama.config, llama.dtype)
    free = snapshot.device("cpu").free_bytes

    assert headroom.device == "cpu" and headroom.dtype == "float32"
    assert headroom.bytes_per_token == profile.bytes_per_token > 0
    assert [(d.device, d.layers, d.free_bytes) for d in headroom.devices] == [("cpu", LAYERS, free)]
    assert [(f.batch, f.tokens) for f in headroom.fits] == [
        (1, tokens_that_fit(profile, free, 1)),
        (8, tokens_that_fit(profile, free, 8)),
    ]
    assert headroom.summary.startswith("KV cache 1 KiB/token on cpu: ~")
    assert "tokens fit at batch 1" in headroom.summary and "at batch 8" in headroom.summary


def test_exact_numbers_on_a_small_budget(llama):
    per_token = kv_cache_profile(llama.config, llama.dtype).bytes_per_token  # 4 layers x 2 x 2 heads x 16 x 4 B
    assert per_token == LAYERS * 2 * 2 * 16 * 4
    headroom = generation_headroom(llama, "model", cpu_only(MiB), batch=3)
    assert [f.tokens for f in headroom.fits] == [MiB // per_token, MiB // (3 * per_token)]
    assert headroom.summary == "KV cache 1 KiB/token on cpu: ~1,000 tokens fit at batch 1, ~340 at batch 3"


def test_the_cache_takes_the_models_dtype_not_the_configs(tiny_models):
    """A bf16 checkpoint loads as float32 on 4.x (no dtype given), and so does its cache."""
    model = AutoModelForCausalLM.from_pretrained(tiny_models(dtype="bfloat16"))
    headroom = generation_headroom(model, "model", cpu_only(MiB))
    bf16 = kv_cache_profile(model.config, torch.bfloat16).bytes_per_token
    assert headroom.dtype == str(model.dtype).removeprefix("torch.")
    assert headroom.bytes_per_token == (bf16 if TRANSFORMERS_5 else 2 * bf16)


def test_dispatched_model_keeps_its_cache_on_the_execution_device(tiny_models):
    """cpu + disk split: the disk-mapped layers run on cpu, so the whole cache goes there."""
    model = AutoModelForCausalLM.from_pretrained(tiny_models(), device_map="auto", max_memory={"cpu": 400_000})
    assert "disk" in model.hf_device_map.values()
    assert any(p.device.type == "meta" for p in model.parameters())
    headroom = generation_headroom(model, "model", cpu_only(MiB))
    assert [(d.device, d.layers) for d in headroom.devices] == [("cpu", LAYERS)]
    assert headroom.fits[0].tokens == MiB // headroom.bytes_per_token


@pytest.mark.parametrize("hook_type", ["align", "sequential"])
def test_mixed_placement_counts_each_device(tiny_models, hook_type):
    """Layers 0-1 on cuda:0, 2-3 on cpu: each device holds its layers' cache, the fuller one bounds."""
    model = AutoModelForCausalLM.from_pretrained(tiny_models())
    for layer in model.model.layers[:2]:
        on_gpu_without_moving(layer, hook_type)
    per_layer = kv_cache_profile(model.config, model.dtype).layers[0].bytes_per_token
    gpu_free = 100_000 + 28_000  # driver free + PyTorch's unused cache
    headroom = generation_headroom(model, "model", with_gpu(100_000, 28_000, 10 * MiB), batch=2)

    assert [(d.device, d.layers, d.bytes_per_token, d.free_bytes) for d in headroom.devices] == [
        ("cuda:0", 2, 2 * per_layer, gpu_free),
        ("cpu", 2, 2 * per_layer, 10 * MiB),
    ]
    assert [f.tokens for f in headroom.devices[0].fits] == [gpu_free // (2 * per_layer), gpu_free // (4 * per_layer)]
    assert [f.tokens for f in headroom.fits] == [f.tokens for f in headroom.devices[0].fits]  # cuda:0 fills first
    assert headroom.bytes_per_token == LAYERS * per_layer
    assert "cuda:0 (2 layers) + cpu (2 layers)" in headroom.summary
    assert any("split" in note for note in headroom.notes)


def test_gpu_free_memory_not_measured_is_a_note(tiny_models):
    model = AutoModelForCausalLM.from_pretrained(tiny_models())
    for layer in model.model.layers:
        on_gpu_without_moving(layer)
    headroom = generation_headroom(model, "model", cpu_only(10 * MiB), batch=4)
    assert headroom.device == "cuda:0" and headroom.bytes_per_token > 0
    assert [f.tokens for f in headroom.fits] == [None, None]
    assert not any(f.unlimited for f in headroom.fits)
    assert any(note.startswith("free memory on cuda:0 unknown (CUDA not initialised") for note in headroom.notes)
    assert "tokens that fit at batch 1 unknown" in headroom.summary


def test_sliding_window_cache_stops_growing(tiny_models):
    model = AutoModelForCausalLM.from_pretrained(tiny_models("mistral"))
    profile = kv_cache_profile(model.config, model.dtype)
    roomy = generation_headroom(model, "model", cpu_only(MiB))
    assert roomy.fits[0].unlimited and roomy.fits[0].tokens is None
    assert roomy.bytes_per_token == 0 and roomy.sliding_bytes_per_token == profile.sliding_bytes_per_token
    assert "no token limit" in roomy.summary and "16-token window" in roomy.summary
    # Less memory than the full windows take: a finite answer, kvcache's.
    tight = profile.sliding_cap_bytes // 2
    small = generation_headroom(model, "model", cpu_only(tight))
    assert small.fits[0].tokens == tokens_that_fit(profile, tight) and not small.fits[0].unlimited


@pytest.mark.parametrize("arch", ["gemma2", "deepseek_v3"])
def test_other_architectures_follow_kvcache(tiny_models, arch):
    model = AutoModelForCausalLM.from_pretrained(tiny_models(arch))
    profile = kv_cache_profile(model.config, model.dtype)
    headroom = generation_headroom(model, "model", cpu_only(4 * MiB), batch=2)
    assert headroom.bytes_per_token == profile.bytes_per_token
    assert [f.tokens for f in headroom.fits] == [tokens_that_fit(profile, 4 * MiB, b) for b in (1, 2)]
    assert [(d.device, d.layers) for d in headroom.devices] == [("cpu", LAYERS)]


def test_configs_without_the_fields_give_notes(llama):
    no_config = generation_headroom(torch.nn.Linear(2, 2), "linear", cpu_only(MiB))
    assert no_config.bytes_per_token is None and no_config.fits[0].tokens is None
    assert no_config.notes == ("the model has no config",)
    assert no_config.summary == "KV cache per token unknown (the model has no config)"

    bare = torch.nn.Linear(2, 2)
    bare.config = types.SimpleNamespace(model_type="custom")
    assert "num_hidden_layers" in generation_headroom(bare, "bare", cpu_only(MiB)).summary

    headless = types.SimpleNamespace(**{**llama.config.to_dict(), "num_attention_heads": None})
    llama_like = torch.nn.Linear(2, 2)
    llama_like.config = headless
    result = generation_headroom(llama_like, "m", cpu_only(MiB))
    assert result.bytes_per_token is None and any("num_attention_heads" in n for n in result.notes)

    recurrent = torch.nn.Linear(2, 2)
    recurrent.config = types.SimpleNamespace(model_type="mamba", num_hidden_layers=2)
    state_only = generation_headroom(recurrent, "r", cpu_only(MiB))
    assert state_only.fits[0].unlimited and state_only.bytes_per_token == 0


def test_to_dict_is_json_and_batch_is_checked(llama):
    data = json.loads(json.dumps(generation_headroom(llama, "model", memory_snapshot(), batch=2).to_dict()))
    assert data["devices"][0]["device"] == "cpu" and [f["batch"] for f in data["fits"]] == [1, 2]
    with pytest.raises(ValueError):
        generation_headroom(llama, "model", memory_snapshot(), batch=0)
