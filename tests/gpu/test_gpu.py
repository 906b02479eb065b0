"""The GPU suite: what only a CUDA device can show. Every test is marked `gpu` and skips without CUDA.

Run on a GPU machine with `python -m pytest -m gpu`; record the output in benchmarks/RESULTS.md.
(Other gpu-marked tests sit beside the features they check: test_devices, test_gpustate, test_oom.)
"""

from __future__ import annotations

import gc
import weakref

import pytest
from cells import ok

pytestmark = pytest.mark.gpu

CUDA_LOAD = (
    "from transformers import AutoModelForCausalLM\n"
    "model = AutoModelForCausalLM.from_pretrained(MODEL_NAME, device_map='cuda:0')\n"
)


@pytest.fixture
def big_model(tiny_models):
    """A checkpoint large enough (~50 MiB) for CUDA figures to stand far above allocator noise."""
    return tiny_models(hidden_size=512, intermediate_size=1024, vocab_size=8192, num_hidden_layers=4)


def test_reload_returns_cuda_memory_to_its_baseline(shell, big_model):
    import torch

    torch.cuda.init()
    baseline = torch.cuda.memory_allocated(0)
    shell.user_ns["_path"] = big_model
    ok(shell, f"%%llmload $_path\n{CUDA_LOAD}")
    one_model = torch.cuda.memory_allocated(0) - baseline
    old = weakref.ref(shell.user_ns["model"])
    ok(shell, "model")  # Out and _ hold it too
    report = ok(shell, f"%%llmload $_path -o\n{CUDA_LOAD}")
    gc.collect()
    assert old() is None and report.released.all_freed
    assert report.released.freed_bytes["cuda:0"] == pytest.approx(one_model, rel=0.01)
    # one model alive, not two: within 1 MiB of baseline + one model
    assert abs(torch.cuda.memory_allocated(0) - baseline - one_model) <= 2**20
    ok(shell, "%llmfree model")
    assert abs(torch.cuda.memory_allocated(0) - baseline) <= 2**20


def test_cuda_cpu_split_shows_both_rows(shell, big_model):
    shell.user_ns["_path"] = big_model
    report = ok(
        shell,
        "%%llmload $_path -o\nfrom transformers import AutoModelForCausalLM\n"
        "model = AutoModelForCausalLM.from_pretrained(MODEL_NAME, device_map='auto', max_memory={0: 20 * 2**20, 'cpu': 2**30})",
    )
    [placement] = report.models
    devices = {row.device for row in placement.rows}
    assert {"cuda:0", "cpu"} <= devices
    assert any("cpu" in warning and "accelerator" in warning for warning in report.warnings)
    predicted = report.predictions[0].prediction
    assert predicted.device_map == {k: str(v) if not isinstance(v, int) else f"cuda:{v}" for k, v in shell.user_ns["model"].hf_device_map.items()}
