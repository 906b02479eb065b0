"""KV cache per token: the profile is proven against real caches of tiny CPU models.

Each tiny model (4 layers, hidden 64) runs a real forward pass with `use_cache=True`; the bytes
of its `past_key_values` are counted from the cache's own tensors, each storage once, and must
equal `kv_cache_bytes` exactly. Runs under transformers 4.57 and 5.x: the Cache API and the MLA
layout differ between them.
"""

from __future__ import annotations

import json

import pytest
import torch
from support.tinymodels import tiny_config
from transformers import AutoConfig, AutoModelForCausalLM

from llm_magic.compat.transformers import major as transformers_major
from llm_magic.measure.kvcache import (
    KVProfile,
    kv_cache_bytes,
    kv_cache_profile,
    tokens_that_fit,
)
from llm_magic.measure.layer_types import FULL, NONE, SLIDING

TRANSFORMERS_5 = transformers_major() >= 5
WINDOW = 16  # the tiny mistral / gemma2 sliding window (tinymodels.ARCHITECTURES)
KiB = 1024


# --------------------------------------------------------------------------- real caches


def cache_tensors(cache) -> list:
    """The K/V tensors a cache object holds, whatever its API version."""
    layers = getattr(cache, "layers", None)
    if layers is not None:  # 4.56+ and 5.x: Cache.layers[i].keys / .values
        found = []
        for layer in layers:
            for name in ("keys", "values"):
                tensor = getattr(layer, name, None)
                if isinstance(tensor, torch.Tensor):
                    found.append(tensor)
        return found
    if hasattr(cache, "key_cache"):  # before 4.56: parallel lists
        return [t for t in [*cache.key_cache, *cache.value_cache] if isinstance(t, torch.Tensor)]
    return [t for pair in cache for t in pair if isinstance(t, torch.Tensor)]  # legacy tuples


def storage_bytes(tensors) -> int:
    """Bytes of memory behind tensors, each storage once (slices share their base's storage)."""
    storages = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        storages[(str(tensor.device), storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


def visible_bytes(tensors) -> int:
    """Bytes of the tensors' own elements (what attention reads), ignoring their bases."""
    return sum(t.numel() * t.element_size() for t in tensors)


def other_cache_tensor_bytes(cache) -> int:
    """Bytes of tensors a cache's layers hold besides K and V (5.x: the window as a tensor)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for name, value in vars(layer).items():
            if name not in ("keys", "values") and isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total


@pytest.fixture(scope="module")
def tiny_cpu_models():
    """`get(arch, dtype)` -> (model, its profile): tiny models built from config, cached."""
    built = {}

    def get(arch: str, dtype=torch.float32):
        key = (arch, dtype)
        if key not in built:
            config = tiny_config(arch)
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config).to(dtype).eval()
            built[key] = (model, kv_cache_profile(model.config, model.dtype))
        return built[key]

    return get


def run(model, tokens: int, batch: int = 1, past=None):
    ids = torch.randint(4, model.config.vocab_size, (batch, tokens))
    with torch.no_grad():
        return model(ids, past_key_values=past, use_cache=True).past_key_values


CASES = [
    ("llama", torch.float32),  # GQA: 2 kv heads for 4 query heads
    ("llama", torch.bfloat16),
    ("mistral", torch.float32),  # every layer slides, window 16
    ("gemma2", torch.float32),  # head_dim 32 != 64 / 4; sliding and full layers alternate
    ("deepseek_v3", torch.float32),  # MLA
]


@pytest.mark.parametrize("arch,dtype", CASES, ids=[f"{a}-{str(d)[6:]}" for a, d in CASES])
def test_decoding_cache_bytes_match_real_cache(tiny_cpu_models, arch, dtype):
    """Prefill n-1 tokens, decode one: the cache holds exactly kv_cache_bytes(profile, n)."""
    model, profile = tiny_cpu_models(arch, dtype)
    fixed = set()
    for total in (2, WINDOW - 1, WINDOW, WINDOW + 1, 40):
        cache = run(model, 1, past=run(model, total - 1))
        tensors = cache_tensors(cache)
        assert len(tensors) == 2 * model.config.num_hidden_layers
        assert storage_bytes(tensors) == kv_cache_bytes(profile, total), (arch, total)
        # Besides K and V the layers hold nothing that grows with the tokens: 5.x keeps each
        # sliding layer's window as an 8-byte tensor, 4.57 nothing.
        fixed.add(other_cache_tensor_bytes(cache))
    assert len(fixed) == 1 and fixed.pop() <= 8 * len(profile.layers)


@pytest.mark.parametrize("arch,dtype", CASES, ids=[f"{a}-{str(d)[6:]}" for a, d in CASES])
def test_prefill_cache_bytes_match_real_cache(tiny_cpu_models, arch, dtype):
    """After one forward over n tokens, sliding layers still hold all n (a view's base)."""
    model, profile = tiny_cpu_models(arch, dtype)
    for tokens in (5, WINDOW, 40):
        tensors = cache_tensors(run(model, tokens))
        assert storage_bytes(tensors) == kv_cache_bytes(profile, tokens, prefill=True), (arch, tokens)


@pytest.mark.skipif(not TRANSFORMERS_5, reason="heterogeneous per-layer configs are transformers 5")
def test_per_layer_config_and_shared_layers_match_real_cache():
    """Gemma 4: full layers have their own head_dim and kv heads (`per_layer_config`), and
    the last layers reuse earlier layers' caches (`kv_sharing_modes`)."""
    config = AutoConfig.for_model(
        "gemma4_text",
        vocab_size=256,
        vocab_size_per_layer_input=256,
        hidden_size=64,
        hidden_size_per_layer_input=16,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        global_head_dim=32,
        attention_k_eq_v=True,  # full layers: values are keys, 1 global kv head
        num_global_key_value_heads=1,
        sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention"] * 3,
        num_kv_shared_layers=2,
    )
    profile = kv_cache_profile(config, "float32")
    assert [(layer.kind, layer.bytes_per_token) for layer in profile.layers] == [
        (SLIDING, 2 * 2 * 16 * 4),
        (FULL, 2 * 1 * 32 * 4),
        (SLIDING, 2 * 2 * 16 * 4),
        (FULL, 2 * 1 * 32 * 4),
        (NONE, 0),
        (NONE, 0),
    ]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    for total in (5, 40):
        cache = run(model, 1, past=run(model, total - 1))
        assert storage_bytes(cache_tensors(cache)) == kv_cache_bytes(profile, total)


def test_sliding_layers_keep_window_minus_one_tokens_in_a_window_sized_buffer(tiny_cpu_models):
    """NOTES' `window - 1` is what attention sees; the memory held while decoding is `window`."""
    model, profile = tiny_cpu_models("gemma2")
    cache = run(model, 1, past=run(model, 39))
    for layer_profile, layer in zip(profile.layers, cache.layers):
        keys = layer.keys
        if layer_profile.kind == SLIDING:
            assert keys.shape[-2] == WINDOW - 1
            assert keys.untyped_storage().nbytes() == WINDOW * keys[..., :1, :].numel() * keys.element_size()
        else:
            assert keys.shape[-2] == 40
    per_token_visible = sum(
        layer.bytes_per_token * (min(40, layer.window - 1) if layer.window else 40) for layer in profile.layers
    )
    assert visible_bytes(cache_tensors(cache)) == per_token_visible


def test_batch_multiplies_real_cache(tiny_cpu_models):
    model, profile = tiny_cpu_models("gemma2")
    cache = run(model, 1, batch=3, past=run(model, 24, batch=3))
    assert storage_bytes(cache_tensors(cache)) == kv_cache_bytes(profile, 25, batch=3)


def test_tiny_profiles_by_hand():
    llama = kv_cache_profile(tiny_config("llama"), "float32")
    assert llama.bytes_per_token == 4 * 2 * 2 * 16 * 4  # layers x K,V x kv heads x head_dim x 4 B
    assert [layer.kind for layer in llama.layers] == [FULL] * 4

    gemma2 = kv_cache_profile(tiny_config("gemma2"), "float32")
    assert [layer.kind for layer in gemma2.layers] == [SLIDING, FULL, SLIDING, FULL]
    assert gemma2.layers[0].bytes_per_token == 2 * 2 * 32 * 4  # head_dim 32, not 64 // 4
    assert gemma2.bytes_per_token == gemma2.sliding_bytes_per_token == 2 * 512
    assert gemma2.sliding_cap_bytes == 2 * 512 * WINDOW

    deepseek = kv_cache_profile(tiny_config("deepseek_v3"), "float32")
    if TRANSFORMERS_5:  # latent: kv_lora_rank 16 + qk_rope_head_dim 8
        assert deepseek.bytes_per_token == 4 * (16 + 8) * 4
    else:  # 4 heads x (K 16+8 + V 16)
        assert deepseek.bytes_per_token == 4 * 4 * (16 + 8 + 16) * 4


# --------------------------------------------------------------------------- published configs


def llama3_8b_config():
    return AutoConfig.for_model(
        "llama",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        dtype="bfloat16",
    )


def test_llama3_8b_is_128_kib_per_token():
    profile = kv_cache_profile(llama3_8b_config())  # "auto": the config's bfloat16
    assert profile.dtype == "bfloat16" and profile.dtype_bytes == 2
    assert profile.bytes_per_token == 128 * KiB
    assert profile.unbounded and profile.sliding_cap_bytes == 0 and profile.notes == ()
    assert kv_cache_bytes(profile, 8192) == 1024 * 1024 * 1024  # 8k tokens = 1 GiB
    assert tokens_that_fit(profile, 80 * 1024**3) == 655_360
    assert tokens_that_fit(profile, 80 * 1024**3, batch=4) == 163_840
    assert kv_cache_profile(llama3_8b_config(), torch.float32).bytes_per_token == 256 * KiB


def test_deepseek_v3_published_config():
    config = AutoConfig.for_model(
        "deepseek_v3",
        hidden_size=7168,
        num_hidden_layers=61,
        num_attention_heads=128,
        num_key_value_heads=128,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_rope_head_dim=64,
        qk_nope_head_dim=128,
        v_head_dim=128,
    )
    profile = kv_cache_profile(config, "bfloat16")
    if TRANSFORMERS_5:
        assert profile.bytes_per_token == 61 * (512 + 64) * 2 == 70_272  # ~68.6 KiB
        assert "latent" in profile.layers[0].formula
    else:
        assert profile.bytes_per_token == 61 * 128 * (128 + 64 + 128) * 2 == 4_997_120  # ~4.8 MiB
        assert "expanded" in profile.layers[0].formula


# --------------------------------------------------------------------------- which layers slide


def transformers_cache_kinds(config) -> list[tuple[str, int | None]]:
    """(kind, window) per layer of the DynamicCache transformers builds for this config."""
    from transformers import DynamicCache

    layers = DynamicCache(config=config).layers
    kinds = []
    for layer in layers:
        name = type(layer).__name__
        if name == "DummyLayer" or "LinearAttention" in name:
            kinds.append((NONE, None))
        elif getattr(layer, "is_sliding", False):
            kinds.append((SLIDING, layer.sliding_window))
        else:
            kinds.append((FULL, None))
    # 4.x leaves the shared layers (Gemma 3n) out of the cache altogether.
    text = config.get_text_config(decoder=True)
    return kinds + [(NONE, None)] * (text.num_hidden_layers - len(kinds))


FAMILIES = [
    ("mistral", {}),
    ("mistral", {"sliding_window": None}),
    ("qwen2", {}),  # use_sliding_window off: no window at all
    ("qwen2", {"use_sliding_window": True, "max_window_layers": 20}),  # layers >= 20 slide
    ("gemma2", {}),
    ("gemma3", {}),  # multimodal config: the text config decides
    ("gemma3n", {}),  # the last layers reuse others' caches
    ("cohere2", {}),
    ("gpt_oss", {}),
    ("llama4", {}),  # chunked attention counts as a window of attention_chunk_size
    ("phi3", {"sliding_window": 2047}),
    ("ministral", {}),
]


@pytest.mark.parametrize("arch,overrides", FAMILIES, ids=[f"{a}{'+' if o else ''}" for a, o in FAMILIES])
def test_layer_kinds_agree_with_transformers_dynamic_cache(arch, overrides):
    config = AutoConfig.for_model(arch, **overrides)
    profile = kv_cache_profile(config, "bfloat16")
    assert [(layer.kind, layer.window) for layer in profile.layers] == transformers_cache_kinds(config)


def test_qwen2_sliding_window_only_when_enabled():
    off = kv_cache_profile(AutoConfig.for_model("qwen2", num_hidden_layers=4), "bfloat16")
    assert {layer.kind for layer in off.layers} == {FULL}
    on = kv_cache_profile(
        AutoConfig.for_model("qwen2", num_hidden_layers=4, use_sliding_window=True, max_window_layers=2), "bfloat16"
    )
    assert [layer.kind for layer in on.layers] == [FULL, FULL, SLIDING, SLIDING]


def test_recurrent_and_hybrid_layers_cache_nothing_per_token():
    mamba = kv_cache_profile(AutoConfig.for_model("mamba"), "bfloat16")
    assert {layer.kind for layer in mamba.layers} == {NONE}
    assert mamba.bytes_per_token == mamba.sliding_bytes_per_token == 0
    assert tokens_that_fit(mamba, 0) is None
    assert any("recurrent" in note for note in mamba.notes)

    config = AutoConfig.for_model("qwen3_next")  # 3 linear-attention layers per full one
    profile = kv_cache_profile(config, "bfloat16")
    full = [layer for layer in profile.layers if layer.kind == FULL]
    assert len(full) == config.num_hidden_layers // 4
    assert profile.bytes_per_token == len(full) * 2 * config.num_key_value_heads * config.head_dim * 2


def test_multimodal_config_uses_its_text_config():
    config = AutoConfig.for_model("gemma3")
    text = config.get_text_config(decoder=True)
    assert kv_cache_profile(config, "bfloat16").layers == kv_cache_profile(text, "bfloat16").layers


# --------------------------------------------------------------------------- arithmetic


def test_tokens_that_fit_sliding_only():
    profile = kv_cache_profile(tiny_config("mistral"), "float32")  # 1 KiB per token, cap 16
    assert profile.bytes_per_token == 0 and not profile.unbounded
    assert profile.sliding_cap_bytes == WINDOW * KiB
    assert kv_cache_bytes(profile, 1000) == kv_cache_bytes(profile, WINDOW) == WINDOW * KiB
    assert tokens_that_fit(profile, WINDOW * KiB) is None  # the full windows fit: no limit
    assert tokens_that_fit(profile, WINDOW * KiB - 1) == WINDOW - 1
    assert tokens_that_fit(profile, 5 * KiB + 7) == 5
    assert tokens_that_fit(profile, 0) == 0
    assert tokens_that_fit(profile, 2 * WINDOW * KiB, batch=2) is None
    assert tokens_that_fit(profile, 2 * WINDOW * KiB - 1, batch=2) == WINDOW - 1
    # A prompt is cached whole before the window applies.
    assert tokens_that_fit(profile, 100 * KiB, prefill=True) == 100


def test_tokens_that_fit_mixed():
    profile = kv_cache_profile(tiny_config("gemma2"), "float32")  # 1 KiB full + 1 KiB sliding
    per_token = 2 * KiB
    # Below the window every layer grows...
    assert tokens_that_fit(profile, 10 * per_token) == 10
    assert tokens_that_fit(profile, WINDOW * per_token) == WINDOW
    # ...beyond it only the full layers do.
    cap = WINDOW * KiB
    assert tokens_that_fit(profile, cap + 100 * KiB) == 100
    assert tokens_that_fit(profile, cap + 100 * KiB - 1) == 99
    assert tokens_that_fit(profile, 3 * (cap + 100 * KiB), batch=3) == 100
    assert tokens_that_fit(profile, cap + 100 * KiB, prefill=True) == (cap + 100 * KiB) // per_token
    for free in (0, 1, 5_000, 31 * KiB, 33 * KiB, 50_000, 10**6):
        fit = tokens_that_fit(profile, free)
        assert kv_cache_bytes(profile, fit) <= free < kv_cache_bytes(profile, fit + 1)


def test_arguments_are_checked():
    profile = kv_cache_profile(tiny_config("llama"), "float32")
    with pytest.raises(ValueError):
        kv_cache_bytes(profile, -1)
    with pytest.raises(ValueError):
        kv_cache_bytes(profile, 10, batch=0)
    assert tokens_that_fit(profile, -5) == 0


# --------------------------------------------------------------------------- dtype, output


@pytest.mark.parametrize(
    "dtype,name,size",
    [
        ("bfloat16", "bfloat16", 2),
        ("torch.float16", "float16", 2),
        ("fp32", "float32", 4),
        (torch.float8_e4m3fn, "float8_e4m3fn", 1),
        (torch.bfloat16, "bfloat16", 2),
    ],
)
def test_dtype_forms(dtype, name, size):
    profile = kv_cache_profile(tiny_config("llama"), dtype)
    assert (profile.dtype, profile.dtype_bytes) == (name, size)
    assert profile.bytes_per_token == 4 * 2 * 2 * 16 * size


def test_auto_dtype_reads_the_config():
    assert kv_cache_profile(tiny_config("llama", dtype="bfloat16"), "auto").dtype == "bfloat16"
    profile = kv_cache_profile(tiny_config("llama"), "auto")  # no dtype in the config
    assert profile.dtype == "float32"
    assert any("dtype" in note for note in profile.notes)


def test_unknown_dtype_is_an_error():
    with pytest.raises(ValueError):
        kv_cache_profile(tiny_config("llama"), "bfloat17")
    with pytest.raises(ValueError):
        kv_cache_profile(tiny_config("llama"), "Tensor")  # a torch attribute, not a dtype


def test_profile_is_frozen_and_serializable():
    profile = kv_cache_profile(tiny_config("gemma2"), "bfloat16")
    assert isinstance(profile, KVProfile)
    with pytest.raises(Exception):
        profile.bytes_per_token = 0
    data = json.loads(json.dumps(profile.to_dict()))
    assert data["bytes_per_token"] == profile.bytes_per_token
    assert data["layers"][0] == {
        "index": 0,
        "layer_type": "sliding_attention",
        "kind": SLIDING,
        "bytes_per_token": 2 * 2 * 32 * 2,
        "window": WINDOW,
        "max_tokens": WINDOW,
        "formula": "K+V 2 x 2 kv heads x 32 x 2 B",
    }
