"""Nothing is released before the new load is known to be possible.

`%%llmload path` (the literal string "path", a typo anyone makes) used to release the old model,
then fail with a 90-line hub traceback. A source that cannot be found now stops the cell before
any change, in one line; guard mode leaves such a cell alone.
"""

from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path

import pytest
from cells import LOAD, changed_names, hidden_ids, namespace_ids, run


@pytest.fixture
def loaded(shell, tiny_model):
    """A loaded model, displayed: the output history (Out[n], `_`) holds it too."""
    shell.user_ns["_test_path"] = tiny_model
    result, captured = run(shell, f"%%llmload $_test_path\n{LOAD}")
    assert result.success, captured.stdout + captured.stderr
    run(shell, "model")
    assert shell.user_ns["_"] is shell.user_ns["model"]
    return shell


@pytest.mark.parametrize("cell", [f"%%llmload path\n{LOAD}", "%llmload path", f"%%llmload /no/such/dir\n{LOAD}"])
def test_llmload_with_a_source_that_cannot_load_changes_nothing(loaded, cell):
    old = weakref.ref(loaded.user_ns["model"])
    before, hidden = namespace_ids(loaded), hidden_ids(loaded)
    result, captured = run(loaded, cell)
    output = (captured.stdout + captured.stderr).strip()
    assert "nothing was released" in output and len(output.splitlines()) == 1, output
    assert "Traceback" not in output
    assert old() is loaded.user_ns["model"]
    assert changed_names(before, namespace_ids(loaded)) == set()
    assert hidden_ids(loaded) == hidden  # Out[n] and `_` still hold the model


def test_guard_leaves_a_cell_with_a_bad_path_alone(loaded):
    old = weakref.ref(loaded.user_ns["model"])
    before, hidden = namespace_ids(loaded), hidden_ids(loaded)
    result, captured = run(loaded, "model = AutoModelForCausalLM.from_pretrained('/no/such/dir')")
    assert result.error_in_exec is not None  # the cell fails on its own, as it would without us
    assert "guard: released nothing:" in captured.stdout and "/no/such/dir" in captured.stdout
    assert old() is loaded.user_ns["model"]
    assert changed_names(before, namespace_ids(loaded)) == set()
    assert hidden_ids(loaded) == hidden  # Out[n] and `_` still hold the model


def test_a_load_that_fails_after_the_release_says_why_in_one_line(loaded, tmp_path):
    # A directory with a config but no weights: the source check passes, the load fails.
    broken = tmp_path / "no-weights"
    broken.mkdir()
    config = json.loads((Path(loaded.user_ns["_test_path"]) / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps(config))
    loaded.user_ns["_broken"] = str(broken)
    old = weakref.ref(loaded.user_ns["model"])
    result, captured = run(loaded, f"%%llmload $_broken -o\n{LOAD}")
    output = captured.stdout + captured.stderr
    assert result.error_in_exec is not None
    gc.collect()
    assert old() is None and "model" not in loaded.user_ns  # released first, as the line says
    assert "The load failed: " in output
    words = " ".join(output.split())  # the line may wrap at the terminal's width
    assert f"The load failed: no weight files (model.safetensors or pytorch_model.bin) in {broken}" in words
    # The traceback keeps the user's frames and the frame that raised, not the loader's internals.
    files = [tb.tb_frame.f_code.co_filename for tb in _entries(result.error_in_exec.__traceback__)]
    body = max(i for i, name in enumerate(files) if "ipython-input" in name or "ipykernel" in name)
    assert len(files) - body == 2, files  # the body's frame, then only the one that raised
    assert files[-1].endswith("modeling_utils.py")


def _entries(tb):
    while tb is not None:
        yield tb
        tb = tb.tb_next
