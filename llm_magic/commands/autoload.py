"""The loader `%llmload MODEL` runs when the cell has no body: tokenizer + causal LM."""

from __future__ import annotations

from typing import Any

# The values `--device-map` takes, in the magic's help and in the README (a test checks that the
# README lists these; `--dtype`'s are names.DTYPE_CHOICES). The first is the default. Any other
# device string transformers accepts (cuda:1, mps, ...) works too.
DEVICE_MAP_CHOICES = ("auto", "sequential", "cpu", "cuda:0", "none")


def parse_device_map(value: str) -> Any:
    """'auto', 'cpu', 'cuda:0', ... as given; 'none' means no device_map (plain cpu load)."""
    return None if value.lower() == "none" else value


def load_tokenizer(model_name: str, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_name, trust_remote_code=trust_remote_code)


def load_causal_lm(
    model_name: str,
    *,
    dtype: Any = "auto",
    device_map: Any = "auto",
    max_memory: dict | None = None,
    trust_remote_code: bool = False,
):
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if max_memory is not None:
        kwargs["max_memory"] = max_memory
    return AutoModelForCausalLM.from_pretrained(model_name, **kwargs)
