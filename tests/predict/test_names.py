"""Device and dtype names: one spelling, one order, one answer to "is it an accelerator"."""

from __future__ import annotations

import pytest
import torch

from llm_magic.names import (
    accelerate_key,
    accelerators,
    device_sort_key,
    dtype_name,
    is_accelerator,
    normalize_device,
    normalize_device_map,
    parse_dtype,
    sort_devices,
    tier,
)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (0, "cuda:0"),
        ("1", "cuda:1"),
        ("cuda", "cuda:0"),
        ("cuda:3", "cuda:3"),
        ("mps", "mps:0"),
        ("xpu", "xpu:0"),
        ("cpu", "cpu"),
        ("disk", "disk"),
        ("meta", "meta"),
        (torch.device("cuda", 1), "cuda:1"),
        (torch.device("cpu"), "cpu"),
        (torch.device("mps"), "mps:0"),
    ],
)
def test_every_spelling_of_a_device_has_one_name(given, expected):
    assert normalize_device(given) == expected


def test_bare_and_indexed_accelerators_are_the_same_row():
    """A tensor made on "mps" reports mps:0; the predicted and measured rows must meet."""
    assert normalize_device("mps") == normalize_device(torch.device("mps", 0)) == "mps:0"
    assert normalize_device_map({"model": 0, "lm_head": "cpu", "x": "disk"}) == {
        "model": "cuda:0", "lm_head": "cpu", "x": "disk"}


def test_accelerate_keys_are_cuda_ordinals():
    assert accelerate_key("cuda:1") == 1
    assert accelerate_key("cpu") == "cpu" and accelerate_key("mps:0") == "mps:0"


def test_tiers_and_accelerators():
    assert [tier(d) for d in ("cuda:0", "mps:0", "xpu:1", "cpu", "disk", "meta")] == [
        "accelerator", "accelerator", "accelerator", "cpu", "disk", "disk"]
    assert [is_accelerator(d) for d in ("cuda:0", "npu:0", "cpu", "disk", "meta")] == [True, True, False, False, False]


def test_order_is_fastest_tier_first_and_numeric():
    devices = ["disk", "cpu", "cuda:10", "meta", "npu:0", "mps:0", "cuda:2", "xpu:0"]
    assert sort_devices(devices) == ["cuda:2", "cuda:10", "xpu:0", "mps:0", "npu:0", "cpu", "disk", "meta"]
    assert accelerators({"cpu": 1, "cuda:1": 1, "cuda:0": 1}) == ["cuda:0", "cuda:1"]
    assert device_sort_key("cuda:2") < device_sort_key("cuda:10") < device_sort_key("cpu")


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("bf16", torch.bfloat16),
        ("bfloat16", torch.bfloat16),
        ("torch.float16", torch.float16),
        ("fp16", torch.float16),
        ("half", torch.float16),
        ("float", torch.float32),
        (torch.float32, torch.float32),
        ("auto", "auto"),
    ],
)
def test_dtype_spellings(given, expected):
    assert parse_dtype(given) == expected


def test_transformers_spellings_only_without_aliases():
    """from_pretrained takes torch's names, not "bf16": the pre-flight parses as it does."""
    assert parse_dtype("bfloat16", aliases=False) is torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'bf16'"):
        parse_dtype("bf16", aliases=False)
    for bad in ("float77", "Linear", 3):
        with pytest.raises(ValueError, match="unknown dtype"):
            parse_dtype(bad)


def test_dtype_names():
    assert dtype_name(torch.bfloat16) == "bfloat16"
    assert dtype_name(parse_dtype("fp32")) == "float32"
