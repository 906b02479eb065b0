"""Guard mode in a real ipykernel: only `%load_ext llm_magic` added to an ordinary notebook.

The reload cell is the plain `model = X.from_pretrained(path)` of model cards; the loader
records, from inside the loading call, whether the old model is still alive. Before the reload
the model was displayed (Out, `_`) and a cell failed while holding it (the last traceback).
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.notebook

CELLS = [
    "%load_ext llm_magic",
    (
        "import gc, os, weakref\n"
        "from transformers import LlamaForCausalLM\n"
        "path = os.environ['LLM_MAGIC_DEMO_MODEL']\n"
        "seen, old = [], None\n\n"
        "class Checked(LlamaForCausalLM):\n"
        "    @classmethod\n"
        "    def from_pretrained(cls, *args, **kwargs):\n"
        "        gc.collect()\n"
        "        seen.append(old() if old is not None else None)\n"
        "        return super().from_pretrained(*args, **kwargs)"
    ),
    "model = Checked.from_pretrained(path)",
    "model",
    "def step(m):\n    raise RuntimeError('shape mismatch (simulated)')\n\nstep(model)",
    "old = weakref.ref(model)",
    "model = Checked.from_pretrained(path)",  # the re-run
    "print('old model alive while the new one was built:', seen[-1] is not None)",
]


def _stream_text(cell) -> str:
    return "".join(output.get("text", "") for output in cell.outputs if output.output_type == "stream")


def test_rerunning_a_plain_load_cell_releases_the_old_model_first(tmp_path, tiny_model):
    import nbformat
    from support.demo import execute_notebook

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(source) for source in CELLS]
    nb.cells[4].metadata["tags"] = ["raises-exception"]
    path = tmp_path / "guard.ipynb"
    nbformat.write(nb, str(path))
    executed = execute_notebook(path, tiny_model)
    reload_output = _stream_text(executed.cells[6])
    assert reload_output.startswith("released `model` ("), reload_output
    assert "also in Out[4], _4, _, last traceback" in reload_output
    assert "`%llmguard off` to stop" in reload_output
    assert "model (Checked, " in reload_output  # the placement line, after the cell
    assert _stream_text(executed.cells[7]).strip() == "old model alive while the new one was built: False"
    first_load = _stream_text(executed.cells[2])
    assert "released" not in first_load and "model (Checked, " in first_load
