"""Guard mode: with only `%load_ext llm_magic`, re-running a plain load cell releases the old model
(and its hidden copies) before the new one is built, and changes nothing else."""

from __future__ import annotations

import gc
import weakref

import pytest
from cells import changed_names, namespace_ids, run

LOAD = "from transformers import AutoModelForCausalLM\nmodel = AutoModelForCausalLM.from_pretrained(path)\n"

# A loader that records, from inside the loading call, whether the old model is still alive.
PROBE = """
import gc, weakref
from transformers import LlamaForCausalLM

seen = []

class Checked(LlamaForCausalLM):
    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        gc.collect()
        seen.append(old() if old is not None else None)
        return super().from_pretrained(*args, **kwargs)

old = None
"""


@pytest.fixture
def loaded(shell, tiny_model):
    shell.user_ns["path"] = tiny_model
    result, captured = run(shell, LOAD)
    assert result.success, captured.stdout + captured.stderr
    return shell


def test_rerun_releases_old_model_and_hidden_copies_before_the_load(loaded):
    shell = loaded
    run(shell, PROBE)
    run(shell, "model = Checked.from_pretrained(path)")
    run(shell, "model")  # Out[n], _n, _ hold it
    run(shell, "def step(m):\n    raise RuntimeError('shape mismatch')\nstep(model)")  # the traceback holds it
    run(shell, "old = weakref.ref(model)")
    result, captured = run(shell, "model = Checked.from_pretrained(path)")
    assert result.success, captured.stdout + captured.stderr
    assert shell.user_ns["seen"][-1] is None, "the old model was alive while the new one was built"
    line = next(line for line in captured.stdout.splitlines() if line.startswith("released `model`"))
    assert "also in Out[" in line and "last traceback" in line and "`%llmguard off` to stop" in line
    assert captured.stdout.index("released `model`") < captured.stdout.index("model (Checked")  # before, then placement


def test_the_line_comes_only_when_something_was_released(loaded):
    result, captured = run(loaded, "x = 1 + 1")
    assert captured.stdout == ""
    result, captured = run(loaded, "from transformers import AutoConfig\nconfig = AutoConfig.from_pretrained(path)")
    assert "released" not in captured.stdout  # a config holds no tensors: nothing to release


def test_a_cell_that_reads_the_model_it_rebinds_keeps_it(loaded):
    old = weakref.ref(loaded.user_ns["model"])
    before = namespace_ids(loaded)
    body = (
        "from peft import LoraConfig, get_peft_model\n"
        "model = get_peft_model(AutoModelForCausalLM.from_pretrained(path) if model is None else model, LoraConfig(r=2, target_modules=['q_proj']))\n"
    )
    result, captured = run(loaded, body)
    assert result.success, captured.stdout + captured.stderr
    assert "guard: kept `model`: the cell reads it before rebinding it" in captured.stdout
    assert old() is not None and "released `model`" not in captured.stdout
    assert changed_names(before, namespace_ids(loaded)) == {"model", "LoraConfig", "get_peft_model"}


def test_a_cell_with_no_load_changes_nothing_but_itself(loaded):
    before = namespace_ids(loaded)
    old = weakref.ref(loaded.user_ns["model"])
    result, captured = run(loaded, "n_params = sum(p.numel() for p in model.parameters())")
    assert result.success
    assert changed_names(before, namespace_ids(loaded)) == {"n_params"}
    assert old() is loaded.user_ns["model"] and captured.stdout == ""


def test_guard_never_changes_what_the_cell_returns_or_raises(loaded):
    result, _ = run(loaded, "model = AutoModelForCausalLM.from_pretrained(path)\n41 + 1")
    assert result.result == 42
    result, captured = run(loaded, "model = AutoModelForCausalLM.from_pretrained(path)\nraise KeyError('mine')")
    assert type(result.error_in_exec) is KeyError and result.error_in_exec.args == ("mine",)


def test_guard_off_and_config(loaded):
    run(loaded, "%llmguard off")
    old = weakref.ref(loaded.user_ns["model"])
    result, captured = run(loaded, LOAD)
    assert "released" not in captured.stdout and "model (" not in captured.stdout
    del result
    gc.collect()
    run(loaded, "%config LLMMagic.guard = True")
    run(loaded, "model")
    old = weakref.ref(loaded.user_ns["model"])
    result, captured = run(loaded, LOAD)
    assert "released `model`" in captured.stdout
    gc.collect()
    assert old() is None
    result, captured = run(loaded, "%llmguard maybe")
    assert "%llmguard on|off" in captured.stdout + captured.stderr


def test_llmload_cells_are_left_to_the_magic(loaded, tiny_model):
    loaded.user_ns["_test_path"] = tiny_model
    result, captured = run(loaded, "%%llmload $_test_path\nmodel = AutoModelForCausalLM.from_pretrained(MODEL_NAME)\n")
    assert result.success
    assert "released `model`" not in captured.stdout  # the magic's own report, not guard's line


def test_watch_prints_the_placement_line_once(loaded):
    run(loaded, "%llmwatch on")
    result, captured = run(loaded, LOAD)
    assert sum(line.startswith("model (LlamaForCausalLM") for line in captured.stdout.splitlines()) == 1


def test_unload_restores_the_callbacks_exactly(shell):
    shell.run_line_magic("unload_ext", "llm_magic")
    before = {event: list(callbacks) for event, callbacks in shell.events.callbacks.items()}
    shell.run_line_magic("load_ext", "llm_magic")
    assert any(len(shell.events.callbacks[e]) > len(before[e]) for e in ("pre_run_cell", "post_run_cell"))
    shell.run_line_magic("unload_ext", "llm_magic")
    assert {event: list(callbacks) for event, callbacks in shell.events.callbacks.items()} == before


def test_a_failure_inside_guard_is_one_line_and_the_cell_runs(loaded, monkeypatch):
    import llm_magic.commands.guard as guard

    def broken(*_):
        raise RuntimeError("boom")

    monkeypatch.setattr(guard, "load_sites", broken)
    result, captured = run(loaded, "model = AutoModelForCausalLM.from_pretrained(path)\n'ran'")
    assert result.result == "ran"
    assert "llm_magic: guard mode (before the cell) failed: RuntimeError: boom" in captured.stderr
