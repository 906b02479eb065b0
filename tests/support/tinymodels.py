"""Tiny, real transformers checkpoints built from configs, for the demo, tests and benchmarks.

Nothing here touches the network: the config is written by hand, the weights are random, and
the tokenizer is a word-level `tokenizers` model wrapped as a `PreTrainedTokenizerFast`. The
result is an ordinary local checkpoint directory that `from_pretrained(path)` loads offline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Small on purpose (a few hundred KB): tests load these dozens of times on 2 CPU cores.
_BASE = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)

# Per-architecture extras that keep the config valid and exercise what makes the family
# different (GQA, sliding windows, head_dim overrides, MLA).
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {"sliding_window": 16},
    "gemma2": {"head_dim": 32, "sliding_window": 16, "query_pre_attn_scalar": 32},
    "deepseek_v3": {
        "num_key_value_heads": 4,  # MLA has no grouped KV heads
        "kv_lora_rank": 16,
        "q_lora_rank": 32,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 16,
        "v_head_dim": 16,
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "n_shared_experts": 1,
        "moe_intermediate_size": 32,
        "first_k_dense_replace": 1,
        "n_group": 1,
        "topk_group": 1,
        "rope_scaling": None,
    },
}

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]


def tiny_config(arch: str = "llama", **overrides: Any):
    """A transformers config object for a tiny model of `arch` (see ARCHITECTURES)."""
    from transformers import AutoConfig

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose from {sorted(ARCHITECTURES)}")
    values = {**_BASE, **ARCHITECTURES[arch], **overrides}
    return AutoConfig.for_model(arch, **values)


def build_tiny_tokenizer(vocab_size: int = _BASE["vocab_size"]):
    """A word-level fast tokenizer with exactly `vocab_size` entries, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(vocab_size - len(SPECIAL_TOKENS))]
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )


def build_tiny_model(
    path: str | Path,
    arch: str = "llama",
    *,
    safe_serialization: bool = True,
    dtype: str = "float32",
    with_tokenizer: bool = True,
    seed: int = 0,
    **config_overrides: Any,
) -> Path:
    """Write a tiny causal-LM checkpoint (config, random weights, tokenizer) to `path`.

    `dtype` is the dtype the weights are saved in (and recorded in the config), so tests can
    tell transformers 5's "load in the checkpoint's dtype" from 4.x's "float32 by default".
    `safe_serialization=False` writes `pytorch_model.bin` and no safetensors, in every version.
    """
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = tiny_config(arch, **config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(path, safe_serialization=safe_serialization)
    safetensors_file = path / "model.safetensors"
    if not safe_serialization and safetensors_file.exists():
        # transformers 5 ignores safe_serialization=False. Write what 4.x writes: torch.save of
        # the whole state dict, tied weights under every name, sharing one storage.
        safetensors_file.unlink()
        torch.save(model.state_dict(), path / "pytorch_model.bin")
    if with_tokenizer:
        build_tiny_tokenizer(config.vocab_size).save_pretrained(path)
    return path
