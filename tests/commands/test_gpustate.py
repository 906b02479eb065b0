"""`%gpustate`: memory per device and the objects that hold it, named as the user would."""

from __future__ import annotations

import gc
import json
import weakref

import pytest
from cells import run
from IPython.utils.capture import capture_output


def gpustate(shell, line="--all"):
    with capture_output() as captured:
        state = shell.run_line_magic("gpustate", f"{line} -o")
    return state, captured.stdout


def load_model(shell, path, name):
    shell.user_ns["_test_path"] = path
    run(shell, f"from transformers import AutoModelForCausalLM\n{name} = AutoModelForCausalLM.from_pretrained(_test_path)")
    return weakref.ref(shell.user_ns[name])


def rows_by_path(state):
    return {row.path: row for row in state.holders.rows}


def test_named_model_row_and_cpu_memory(shell, tiny_model):
    load_model(shell, tiny_model, "model")
    state, output = gpustate(shell)
    row = rows_by_path(state)["model"]
    assert row.kind == "named" and row.type_name == "LlamaForCausalLM"
    assert row.bytes_by_device["cpu"] > 600_000
    cpu = state.memory.device("cpu")
    assert cpu.total_bytes >= cpu.free_bytes > 0 and cpu.rss_bytes > 0
    assert "model" in output and "RSS" in output and "tensors explain" in output
    # The returned snapshot displays as the same table (a notebook's `state` cell), not a dataclass dump.
    bundle = state._repr_mimebundle_()
    assert "tensors explain" in bundle["text/plain"] and 'class="llm-magic"' in bundle["text/html"]


def test_model_held_only_by_output_is_a_hidden_holder(shell, tiny_model):
    load_model(shell, tiny_model, "model")
    run(shell, "model")
    number = max(shell.user_ns["Out"])
    run(shell, "del model")
    state, output = gpustate(shell)
    row = rows_by_path(state)[f"Out[{number}]"]
    assert row.kind == "hidden" and row.bytes_by_device["cpu"] > 600_000
    assert "model" not in rows_by_path(state)
    assert any(f"only by Out[{number}]" in flag and "%llmfree --hidden" in flag for flag in state.flags)


def test_model_held_only_by_traceback_names_frame_and_local(shell, tiny_model):
    load_model(shell, tiny_model, "model")
    run(shell, "def step(m):\n    raise RuntimeError('shape mismatch (simulated)')\nstep(model)")
    run(shell, "del model")
    state, output = gpustate(shell)
    label = "last traceback, frame `step()`, local `m`"
    assert rows_by_path(state)[label].kind == "hidden"
    assert "step()" in output and "local `m`" in output


def test_llmfree_hidden_frees_both_and_json_shows_bytes_gone(shell, tiny_model):
    shown = load_model(shell, tiny_model, "shown")
    run(shell, "shown")
    run(shell, "del shown")
    failed = load_model(shell, tiny_model, "failed")
    run(shell, "def step(m):\n    raise RuntimeError('shape mismatch')\nstep(failed)")
    run(shell, "del failed")
    before, _ = gpustate(shell)
    assert sum(row.total for row in before.holders.rows if row.kind == "hidden") > 1_200_000

    with capture_output():
        shell.run_line_magic("llmfree", "--hidden")
    gc.collect()
    assert shown() is None and failed() is None

    with capture_output() as captured:
        shell.run_line_magic("gpustate", "--json --all")
    data = json.loads(captured.stdout)
    assert [row for row in data["holders"]["rows"] if row["kind"] == "hidden"] == []
    assert data["holders"]["explained_by_device"].get("cpu", 0) < before.holders.explained_by_device["cpu"] - 1_200_000


def test_shared_storage_counts_once_and_says_so(shell, tiny_model):
    load_model(shell, tiny_model, "model")
    run(shell, "import torch\nopt = torch.optim.SGD(model.parameters(), lr=0.1)\nview = model.lm_head.weight[:10]")
    state, output = gpustate(shell)
    rows = rows_by_path(state)
    assert rows["opt"].shared_with == ("model", "view")
    model_bytes = rows["model"].bytes_by_device["cpu"]
    assert state.holders.explained_by_device["cpu"] == model_bytes  # opt and the view add nothing
    assert "shared" in output


def test_tied_weights_count_once(shell, tiny_models):
    tied = tiny_models(tie_word_embeddings=True)
    load_model(shell, tied, "model")
    state, _ = gpustate(shell)
    model = shell.user_ns["model"]
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    expected = sum(p.numel() * p.element_size() for p in model.parameters())  # parameters() dedupes tied
    expected += sum(b.numel() * b.element_size() for b in model.buffers())
    assert rows_by_path(state)["model"].bytes_by_device["cpu"] == expected


def test_nested_paths_are_named(shell, tiny_model):
    load_model(shell, tiny_model, "model")
    run(shell, "class R:\n    def __init__(self, m): self.model = m\nresults = [R(model)]\ndel model")
    state, _ = gpustate(shell)
    assert rows_by_path(state)["results[0].model"].kind == "named"


# Only an lru_cache's C-level cache holds it: no path from any name reaches it. (A closure
# would not do: `keeper.__closure__[0].cell_contents` reaches its cell, see test_walk_functions.)
KEPT_BY_LRU_CACHE = "import functools\n@functools.lru_cache\ndef keep(m):\n    return 1\nkeep(model)\ndel model"


def test_unnamed_holder_found_with_deep(shell, tiny_model):
    # Libraries imported by earlier tests (peft) keep tiny module-level tensors that --all --deep
    # rightly lists as unnamed: only the rows this test adds count.
    before = {row.path for row in gpustate(shell, "--all --deep")[0].holders.rows if row.kind == "unnamed"}
    load_model(shell, tiny_model, "model")
    run(shell, KEPT_BY_LRU_CACHE)
    shallow, _ = gpustate(shell)
    assert not any(row.kind == "unnamed" for row in shallow.holders.rows)
    deep, output = gpustate(shell, "--all --deep")
    unnamed = [row for row in deep.holders.rows if row.kind == "unnamed" and row.path not in before]
    assert [row.type_name for row in unnamed] == ["LlamaForCausalLM"]
    assert "unnamed" in output


def test_small_holders_hidden_by_default_and_said(shell):
    run(shell, "import torch\nsmall = torch.zeros(10)\nbig = torch.zeros(600_000)")
    state, output = gpustate(shell, "")
    assert "big" in output and "small holder" in output
    assert "small" in rows_by_path(state)  # the data keeps every row; only the table hides it


def test_does_not_initialise_cuda(shell):
    import torch

    run(shell, "import torch\nx = torch.ones(3)")
    gpustate(shell)
    assert not torch.cuda.is_initialized()


def test_json_is_valid_for_odd_names(shell):
    run(shell, "import torch\nd = {'we\\'ird \"key\"\\n': torch.zeros(300_000)}\nмодель = torch.zeros(300_000)")
    with capture_output() as captured:
        shell.run_line_magic("gpustate", "--json --all")
    paths = {row["path"] for row in json.loads(captured.stdout)["holders"]["rows"]}
    assert {"d", "модель"} <= paths


@pytest.mark.gpu
def test_cuda_row_matches_the_allocator(shell):
    import torch

    run(shell, "import torch\nx = torch.empty(256 * 2**20, dtype=torch.uint8, device='cuda')")
    state, _ = gpustate(shell)
    cuda = state.memory.device("cuda:0")
    assert abs(cuda.allocated_bytes - torch.cuda.memory_allocated(0)) <= 2**20
    free, total = torch.cuda.mem_get_info(0)
    assert abs(cuda.free_bytes - free) <= 2**20 and cuda.total_bytes == total
    assert rows_by_path(state)["x"].bytes_by_device["cuda:0"] == 256 * 2**20
    line = next(line for line in state.reconciliation if line.device == "cuda:0")
    assert abs(line.unexplained_bytes) <= 2**20


def test_named_row_says_which_hidden_references_also_hold_it(shell, tiny_model):
    load_model(shell, tiny_model, "model")
    run(shell, "model")
    number = max(shell.user_ns["Out"])
    state, output = gpustate(shell)
    row = rows_by_path(state)["model"]
    assert f"Out[{number}]" in row.also_held_by and "_" in row.also_held_by
    assert "also in" in output


def test_simulated_models_are_not_holders(shell, tiny_model):
    """`%llmfit` and the headroom line keep fake-tensor replicas of a model for reloads: they
    hold no memory and must never show up as unnamed holders."""
    import gc

    from llm_magic.predict.generation import GenerationPredictor

    load_model(shell, tiny_model, "model")
    GenerationPredictor.for_model(shell.user_ns["model"]).peaks(1, 16, 4)  # a replica now kept
    run(shell, "del model")
    gc.collect()
    state, _ = gpustate(shell, "--all --deep")
    assert [row.path for row in state.holders.rows if "LlamaForCausalLM" in row.type_name] == []
