"""The headroom line after `%%llmload`, in a dry run and in the OOM rescue: what one generate call
can take, from the simulated peak (activations included), never past the context window."""

from __future__ import annotations

import re

import pytest
import torch
from cells import run
from support.realpeak import generate_peak, no_eos
from support.tinymodels import tiny_config
from transformers import AutoModelForCausalLM, BertConfig, BertModel

from llm_magic.measure.memory import CUDA_NOT_INITIALISED, DeviceMemory, MemorySnapshot
from llm_magic.predict.gen_headroom import (
    fit_line_for_meta_model,
    headroom,
    model_headroom,
)
from llm_magic.predict.generation import GenerationPredictor


def cpu_free(nbytes: int) -> MemorySnapshot:
    return MemorySnapshot((DeviceMemory("cpu", "RAM", 64 << 30, nbytes),), CUDA_NOT_INITIALISED, 0, "not queried")


def flat(text: str) -> str:
    return " ".join(re.sub(r"\x1b\[[0-9;]*m", "", text).split())


@pytest.fixture(scope="module")
def model():
    return no_eos(AutoModelForCausalLM.from_config(tiny_config("llama"), attn_implementation="eager").eval())


def test_llmload_shows_the_context_not_millions_of_tokens(shell, tiny_model):
    """The demo model has a 256-token context: the old line said "~5,700,000 tokens fit"."""
    shell.user_ns["_path"] = tiny_model
    shell.run_cell("from transformers import AutoModelForCausalLM")
    result, captured = run(shell, "%%llmload $_path -o\nmodel = AutoModelForCausalLM.from_pretrained(MODEL_NAME)")
    output = flat(captured.stdout)
    [item] = result.result.headroom
    assert item.generation.whole_context and item.generation.context_window == 256
    assert "Generation headroom of model (float32, sdpa): fits: the full 256-token context at batch 1" in output
    assert "tokens fit" not in output and not re.search(r"\d{1,3},\d{3},\d{3} tokens", output)


def test_a_tight_budget_names_the_longest_prompt_and_real_runs_agree(model):
    predictor = GenerationPredictor.for_model(model)
    free = predictor.peaks(1, 100, 16)["cpu"]
    line = headroom(model, "model", cpu_free(free), new_tokens=16)
    longest = line.max_prompt_tokens
    assert line.summary == f"prompts over {longest:,} tokens (+16 new) will run out of memory on cpu at batch 1"
    assert longest == 100
    assert generate_peak(model, 1, longest, 16) <= free * 1.01  # the real loop: fits at the answer...
    assert generate_peak(model, 1, longest + 6, 16) > free  # ...and runs out a little beyond it
    assert headroom(model, "model", cpu_free(free)).new_tokens == 128  # the default 256, capped at half the context


def test_encoders_get_no_generation_line(shell, tmp_path):
    BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=37)).save_pretrained(tmp_path / "bert")
    shell.user_ns["_path"] = str(tmp_path / "bert")
    result, captured = run(shell, "%%llmload $_path --no-tokenizer -o\nfrom transformers import AutoModel\nbert = AutoModel.from_pretrained(MODEL_NAME)")
    assert result.success and result.result.models and result.result.headroom == ()
    assert "Generation headroom" not in captured.stdout
    assert model_headroom(shell.user_ns["bert"], "bert", cpu_free(1 << 30)) is None


def test_dry_run_line_for_a_model_not_loaded_yet(model):
    """The meta model of the same config, with the free memory before the load, gives the same
    answer as the loaded model with what is left after it."""
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(model.config, attn_implementation="eager")
    predictor = GenerationPredictor.for_model(model)
    weights = predictor.layout.weights_by_device["cpu"]
    free_after = predictor.peaks(1, 100, 128)["cpu"]
    loaded = headroom(model, "model", cpu_free(free_after))
    planned = fit_line_for_meta_model(meta, "model", None, {"cpu": free_after + weights}, {"cpu": weights})
    assert planned.max_prompt_tokens == loaded.max_prompt_tokens and planned.summary == loaded.summary
    roomy = fit_line_for_meta_model(meta, "model", {"": "cpu"}, {"cpu": 1 << 30}, {"cpu": weights})
    assert roomy.whole_context and roomy.summary.startswith("fits: the full 256-token context at batch 1")


def test_oom_rescue_names_the_input_that_failed(shell, model):
    """A real generate call fails inside the model: the rescue reads the input's size from the
    traceback and says what it needs against the memory free now."""
    shell.user_ns.update(model=model, torch=torch)
    code = (
        "def fail(*args):\n"
        "    raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB.')\n"
        "hook = model.model.layers[1].register_forward_hook(fail)\n"
        "try:\n"
        "    model.generate(torch.full((2, 100), 5), attention_mask=torch.ones(2, 100, dtype=torch.long),\n"
        "                   max_new_tokens=16, pad_token_id=3)\n"
        "finally:\n"
        "    hook.remove()\n"
    )
    result, captured = run(shell, code)
    assert isinstance(result.error_in_exec, torch.OutOfMemoryError)
    rescue = next(m for m in shell.magics_manager.registry.values() if hasattr(m, "oom")).oom
    [item] = rescue.last_explanation.headroom
    line = item.generation
    assert line.summary.startswith("the input that failed (batch 2 x 100 tokens, +16 new) fits in the memory free now")
    assert line.peak_bytes == GenerationPredictor.for_model(model).peaks(2, 100, 16)
    assert "the input that failed (batch 2 x 100 tokens, +16 new)" in flat(captured.stdout + captured.stderr)


def test_a_model_the_simulation_cannot_run_gets_unknown_not_an_error(shell, tiny_model, monkeypatch):
    """Modeling code that fails on fake tensors (or a private helper gone): one "unknown" line
    with the reason, and %%llmload loads and reports as before."""
    from collections import OrderedDict

    from llm_magic.predict import gen_replica, generation

    def broken(*args, **kwargs):
        raise RuntimeError("no fake kernel for this operator")

    monkeypatch.setattr(gen_replica.tf, "build_with_attention", broken)
    monkeypatch.setattr(generation, "_RECENT", OrderedDict())  # no simulation kept from earlier tests
    shell.user_ns["_path"] = tiny_model
    shell.run_cell("from transformers import AutoModelForCausalLM")
    result, captured = run(shell, "%%llmload $_path -o\nmodel = AutoModelForCausalLM.from_pretrained(MODEL_NAME)")
    assert result.success and result.result.models and "model" in shell.user_ns
    [item] = result.result.headroom
    assert item.generation.summary == "unknown (RuntimeError: no fake kernel for this operator)"
    assert "Generation headroom of model: unknown (RuntimeError: no fake kernel for this operator)" in flat(captured.stdout)


def test_a_reload_of_the_same_model_reuses_its_simulations_and_keeps_no_model(tiny_model):
    """Re-running a load cell loads the same checkpoint: its fake runs are not repeated, and the
    kept simulations hold no reference to the real model."""
    import gc
    import weakref

    import torch
    from transformers import AutoModelForCausalLM

    from llm_magic.predict.generation import GenerationPredictor

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    first = GenerationPredictor.for_model(model)
    first.peaks(1, 32, 8)
    runs = first.simulator.runs
    gone = weakref.ref(model)
    del model
    gc.collect()
    assert gone() is None
    again = GenerationPredictor.for_model(AutoModelForCausalLM.from_pretrained(tiny_model))
    assert again is first
    again.peaks(1, 32, 8)
    assert again.simulator.runs == runs  # the same simulation, not run again
    other = GenerationPredictor.for_model(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16))
    assert other is not first
