"""`%llmfree`: the same release engine as `%%llmload`, on names, on everything, on hidden copies."""

from __future__ import annotations

import gc
import weakref

import pytest
from cells import run
from IPython.utils.capture import capture_output


def make_model(shell, path, name="model"):
    shell.user_ns["_test_path"] = path
    run(shell, f"from transformers import AutoModelForCausalLM\n{name} = AutoModelForCausalLM.from_pretrained(_test_path)")
    return weakref.ref(shell.user_ns[name])


def free(shell, line):
    with capture_output() as captured:
        result = shell.run_line_magic("llmfree", line + " -o")
    return result, captured.stdout


def test_free_named_object_and_its_hidden_copies(shell, tiny_model):
    ref = make_model(shell, tiny_model)
    run(shell, "model")
    result, output = free(shell, "model")
    gc.collect()
    assert ref() is None
    assert "model" not in shell.user_ns
    assert result.released[0].freed and result.freed_bytes["cpu"] > 600_000
    assert "Freed:" in output and "KiB cpu" in output


def test_free_attribute_path(shell, tiny_model):
    ref = make_model(shell, tiny_model)
    run(shell, "class Box: pass\nbox = Box()\nbox.model = model\ndel model")
    free(shell, "box.model")
    gc.collect()
    assert ref() is None
    assert "box" in shell.user_ns and not hasattr(shell.user_ns["box"], "model")


def test_unknown_name_releases_nothing(shell, tiny_model):
    ref = make_model(shell, tiny_model)
    with capture_output() as captured:
        shell.run_cell("%llmfree model no_such_thing")
    assert "no_such_thing" in captured.stdout + captured.stderr and "nothing was released" in captured.stdout + captured.stderr
    assert ref() is shell.user_ns["model"]


def test_no_arguments_is_an_error(shell):
    with capture_output() as captured:
        shell.run_cell("%llmfree")
    assert "needs NAME" in captured.stdout + captured.stderr


def test_hidden_frees_output_and_traceback_copies_only(shell, tiny_model):
    shown = make_model(shell, tiny_model, "shown")
    run(shell, "shown")
    run(shell, "del shown")  # now only Out[n], _n, _ hold it
    failed = make_model(shell, tiny_model, "failed")
    run(shell, "def step(m):\n    raise MemoryError('simulated')\nstep(failed)\n")
    run(shell, "del failed")  # now only the last traceback holds it
    kept = make_model(shell, tiny_model, "kept")
    run(shell, "kept")  # a named model with a hidden copy: the copy goes, the model stays
    result, output = free(shell, "--hidden")
    gc.collect()
    assert shown() is None and failed() is None
    assert kept() is shell.user_ns["kept"]
    labels = " ".join(item.label for item in result.released)
    assert "Out[" in labels and "last traceback, frame `step()`, local `m`" in labels
    assert all(item.freed for item in result.released)
    assert any(label.startswith("Out[") for label in result.also_cleared)


def test_all_releases_every_holder(shell, tiny_model):
    refs = [make_model(shell, tiny_model, name) for name in ("a", "b")]
    run(shell, "import torch\nbig = torch.zeros(1000)\nnumbers = [1, 2, 3]")
    free(shell, "--all")
    gc.collect()
    assert all(ref() is None for ref in refs)
    assert "big" not in shell.user_ns and shell.user_ns["numbers"] == [1, 2, 3]


def test_dry_run_changes_nothing(shell, tiny_model):
    ref = make_model(shell, tiny_model)
    run(shell, "model")
    before = dict(shell.user_ns)
    out_before = dict(shell.user_ns["Out"])
    result, output = free(shell, "model --dry-run")
    assert result.dry_run and not result.released[0].freed
    assert "would be released" in output
    assert ref() is shell.user_ns["model"]
    assert dict(shell.user_ns["Out"]) == out_before
    assert set(shell.user_ns) - {"_", "__", "___"} >= set(before) - {"_", "__", "___"}


@pytest.mark.parametrize("line", ["model[", "model()", "1 + 1"])
def test_unparseable_names(shell, tiny_model, line):
    ref = make_model(shell, tiny_model)
    with capture_output() as captured:
        shell.run_cell(f"%llmfree {line}")
    assert ref() is shell.user_ns["model"]
    assert "Traceback" not in captured.stdout + captured.stderr


@pytest.mark.parametrize(
    "line, message",
    [
        ("d['x']", "d has no key 'x'"),
        ("d.x", "d has no attribute 'x'"),
        ("d['inner']['y']", "d['inner'] has no key 'y'"),
        ("items[5]", "items has no item 5"),
        ("nothing_here['x']", "name 'nothing_here' is not defined"),
    ],
)
def test_missing_key_or_attribute_says_which_part_is_missing(shell, tiny_model, line, message):
    ref = make_model(shell, tiny_model)
    run(shell, "d = {'m': model, 'inner': {}}\nitems = [model]")
    before = {name: id(value) for name, value in shell.user_ns.items()}
    with capture_output() as captured:
        shell.run_cell(f"%llmfree model {line}", store_history=False)
    output = captured.stdout + captured.stderr
    assert message in output and "nothing was released" in output, output
    assert "Traceback" not in output and len(output.strip().splitlines()) == 1
    assert {name: id(value) for name, value in shell.user_ns.items()} == before  # nothing changed
    assert ref() is shell.user_ns["model"] is shell.user_ns["d"]["m"]
