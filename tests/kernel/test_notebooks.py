"""Every notebook in notebooks/ executed in a real ipykernel, and its outputs checked.

The kernel runs on this interpreter (see support.demo.execute_notebook), so the same file
tests transformers 4.57 + IPython 8 and transformers 5 + IPython 9 in whichever venv runs it.
The quickstart tells a story; each step's claim is asserted on what the notebook displayed.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from support.demo import NOTEBOOKS

pytestmark = pytest.mark.notebook

NOTEBOOK_PATHS = sorted(NOTEBOOKS.glob("*.ipynb"))
QUICKSTART = NOTEBOOKS / "quickstart.ipynb"
MAGIC_CLASS = 'class="llm-magic"'
MAGIC_LINE = re.compile(r"^\s*%%?(?:llmload|llmfree|gpustate)\b", re.MULTILINE)
# What a terminal colour code looks like, raw or with its ESC byte lost on the way.
ANSI = re.compile(r"\x1b\[|\[(?:\d{1,3};)*\d{1,3}m")


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory) -> Path:
    from support.demo import build_demo_model

    return build_demo_model(tmp_path_factory.mktemp("demo-model"))


@pytest.fixture(scope="module")
def executed(demo_model):
    """`executed(path)` -> the executed notebook; each notebook runs once per module."""
    from support.demo import execute_notebook

    cache: dict[Path, object] = {}

    def run(path: Path):
        if path not in cache:
            try:
                # Every cell runs; the tests below say which ones failed.
                cache[path] = execute_notebook(path, demo_model, allow_errors=True)
            except Exception as error:  # a dead or hung kernel: fail each test fast, not rerun
                cache[path] = error
        if isinstance(cache[path], Exception):
            raise cache[path]
        return cache[path]

    return run


# --- helpers: find cells and read their outputs ------------------------------------------------


def code_cells(nb) -> list:
    return [cell for cell in nb.cells if cell.cell_type == "code"]


def cell_index(nb, prefix: str, occurrence: int = 0) -> int:
    """Index (among code cells) of the `occurrence`-th code cell whose source starts with `prefix`."""
    found = [i for i, cell in enumerate(code_cells(nb)) if cell.source.lstrip().startswith(prefix)]
    assert len(found) > occurrence, f"no cell #{occurrence} starting with {prefix!r}"
    return found[occurrence]


def displays(cell) -> list[dict]:
    return [out["data"] for out in cell.outputs if out.output_type in ("display_data", "execute_result")]


def magic_html(cell) -> list[str]:
    """The llm_magic tables a cell displayed, as HTML."""
    return [data["text/html"] for data in displays(cell) if MAGIC_CLASS in data.get("text/html", "")]


def all_text(cell) -> str:
    """Everything a reader sees in a cell's output, as plain text."""
    parts = []
    for out in cell.outputs:
        if out.output_type == "stream":
            parts.append(out.text)
        elif out.output_type in ("display_data", "execute_result"):
            parts.append(out["data"].get("text/plain", ""))
    return "\n".join(parts)


def stdout(cell) -> str:
    return "".join(out.text for out in cell.outputs if out.output_type == "stream" and out.name == "stdout")


def expects_error(cell) -> bool:
    return "raises-exception" in cell.metadata.get("tags", [])


# --- every notebook ---------------------------------------------------------------------------


def test_there_are_notebooks():
    assert QUICKSTART in NOTEBOOK_PATHS


@pytest.mark.parametrize("path", NOTEBOOK_PATHS, ids=lambda p: p.name)
def test_notebook_is_committed_without_outputs(path):
    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    nbformat.validate(nb)
    dirty = [cell.source.splitlines()[0] for cell in code_cells(nb) if cell.outputs or cell.execution_count]
    assert not dirty, f"cells saved with outputs: {dirty}"


@pytest.mark.parametrize("path", NOTEBOOK_PATHS, ids=lambda p: p.name)
def test_notebook_runs_without_unexpected_errors(executed, path):
    nb = executed(path)
    for cell in code_cells(nb):
        errors = [out for out in cell.outputs if out.output_type == "error"]
        if expects_error(cell):
            assert errors, f"cell tagged raises-exception did not raise:\n{cell.source}"
        else:
            assert not errors, f"{cell.source}\nraised {errors[0].ename}: {errors[0].evalue}"
        # A UsageError (unknown magic, bad option) is printed, not raised: catch it here.
        assert "UsageError" not in all_text(cell), f"{cell.source}\n{all_text(cell)}"


@pytest.mark.parametrize("path", NOTEBOOK_PATHS, ids=lambda p: p.name)
def test_magic_tables_show_once_as_html_and_clean_text(executed, path):
    nb = executed(path)
    for cell in code_cells(nb):
        magics = MAGIC_LINE.findall(cell.source)
        if not magics:
            continue
        tables = magic_html(cell)
        assert len(tables) == len(magics), f"{cell.source!r} displayed {len(tables)} llm_magic tables (want {len(magics)})"
        for data in displays(cell):
            assert not ANSI.search(data.get("text/plain", "")), f"colour codes in text/plain of {cell.source!r}"
        assert not any(ANSI.search(out.text) for out in cell.outputs if out.output_type == "stream")


# --- the quickstart's story, step by step -------------------------------------------------------


@pytest.fixture(scope="module")
def quickstart(executed):
    return executed(QUICKSTART)


def test_quickstart_failing_cell_raised_the_simulated_oom(quickstart):
    cell = code_cells(quickstart)[cell_index(quickstart, "def step")]
    (error,) = [out for out in cell.outputs if out.output_type == "error"]
    assert error.ename == "RuntimeError" and "shape mismatch" in error.evalue


def test_quickstart_gpustate_shows_hidden_copies_before_the_reload(quickstart):
    cells = code_cells(quickstart)
    before = cells[cell_index(quickstart, "%gpustate", 0)]
    assert cell_index(quickstart, "%gpustate", 0) < cell_index(quickstart, "%%llmload")
    (html,) = magic_html(before)
    text = all_text(before)
    for device in ("cpu",):
        assert device in html and device in text
    assert "model" in text
    assert "Out[" in text, f"the displayed model (Out[n]) is not listed:\n{text}"
    assert "traceback" in text, f"the failed cell's frame is not listed:\n{text}"


def test_quickstart_llmload_released_every_copy_and_freed_the_old_model(quickstart):
    cells = code_cells(quickstart)
    load = cells[cell_index(quickstart, "%%llmload")]
    (html,) = magic_html(load)
    text = all_text(load)
    assert "Released" in text and "freed" in text and "NOT freed" not in text
    for copy in (r"Out\[\d+\]", r"\b_\d+\b", r"\b_(?=[,\s])", "last traceback"):
        assert re.search(copy, text), f"{copy!r} not among the references dropped:\n{text}"
    assert "cpu" in html and "LlamaForCausalLM" in html
    check = cells[cell_index(quickstart, "print(\"old model freed")]
    assert "old model freed: True" in stdout(check)


def test_quickstart_gpustate_after_the_reload_shows_no_hidden_copy(quickstart):
    cells = code_cells(quickstart)
    after_index = cell_index(quickstart, "%gpustate", 1)
    assert after_index > cell_index(quickstart, "%%llmload")
    text = all_text(cells[after_index])
    assert "model" in text and "cpu" in text
    assert "Out[" not in text and "traceback" not in text, text


def test_quickstart_llmfree_frees_the_model(quickstart):
    cells = code_cells(quickstart)
    dry = cells[cell_index(quickstart, "%llmfree --all --dry-run")]
    assert "would be released" in all_text(dry)
    final = cells[cell_index(quickstart, "gone = weakref.ref(model)")]
    assert "model freed: True" in stdout(final)


def test_quickstart_guard_releases_the_displayed_model_before_the_plain_reload(quickstart):
    # Without guard mode the old model would survive the re-run: Out[n] and `_` hold it.
    cells = code_cells(quickstart)
    load_line = 'model = AutoModelForCausalLM.from_pretrained(path, device_map="auto")'
    first = cell_index(quickstart, "from transformers import AutoModelForCausalLM")
    displayed, rerun = (cell_index(quickstart, load_line, n) for n in range(2))
    assert "released" not in stdout(cells[first])  # the first load replaces nothing
    assert "released" not in stdout(cells[displayed])  # `model` was freed by %llmfree just before
    text = stdout(cells[rerun])
    assert re.search(r"^released `model` \([\d.]+ MiB cpu; also in Out\[\d+\], _\d+, _[,)]", text), text
    assert "`%llmguard off` to stop" in text
    check = cells[cell_index(quickstart, 'print("old model freed', 1)]
    assert "old model freed: True" in stdout(check)


def test_demo_transcript_has_the_tables_as_plain_text(quickstart):
    from support.demo import format_transcript

    transcript = format_transcript(quickstart)
    assert "%%llmload" in transcript and "old model freed: True" in transcript
    assert "RuntimeError: shape mismatch (simulated)" in transcript
    assert not ANSI.search(transcript)


# --- the OOM rescue and watch-mode notebook -------------------------------------------------------

RESCUE = NOTEBOOKS / "oom_rescue_and_watch.ipynb"


@pytest.fixture(scope="module")
def rescue(executed):
    return executed(RESCUE)


def test_rescue_watch_prints_one_line_for_the_new_model_only(rescue):
    cells = code_cells(rescue)
    load = cells[cell_index(rescue, "from transformers import AutoModelForCausalLM")]
    assert re.search(r"model \(LlamaForCausalLM, [\d.]+ MiB\): \d+ modules cpu", all_text(load))
    assert all_text(cells[cell_index(rescue, "x = 1 + 1")]).strip() == ""


def test_rescue_oom_explained_below_the_traceback_and_frames_freed(rescue):
    cells = code_cells(rescue)
    failing = cells[cell_index(rescue, "import weakref")]
    kinds = [out.output_type for out in failing.outputs]
    assert "error" in kinds and [o for o in failing.outputs if o.output_type == "error"][0].ename == "OutOfMemoryError"
    after_error = failing.outputs[kinds.index("error") + 1 :]
    explanation = " ".join(out["data"].get("text/plain", "") for out in after_error if out.output_type == "display_data")
    assert "tried to allocate 2 GiB" in explanation and "Freed now: 47.7 MiB cpu" in explanation
    assert any(MAGIC_CLASS in out["data"].get("text/html", "") for out in after_error if out.output_type == "display_data")
    assert "activations freed: True" in stdout(cells[cell_index(rescue, 'print("activations freed:"')])


# --- what a JupyterLab user sees besides the reports ----------------------------------------------


@pytest.mark.parametrize("path", NOTEBOOK_PATHS, ids=lambda p: p.name)
def test_no_progress_warning_and_bars_shown_as_they_end(executed, path):
    # The kernel runs with what a JupyterLab user of transformers has (ipywidgets): tqdm draws its
    # bars as widgets and never warns "IProgress not found"; nothing is hidden from the demo.
    from support.demo import WIDGET_VIEW, format_transcript

    nb = executed(path)
    for cell in code_cells(nb):
        assert "IProgress not found" not in all_text(cell)
        assert not [out for out in cell.outputs if out.output_type == "stream" and out.name == "stderr" and "Warning" in out.text]
    bars = [out for cell in code_cells(nb) for out in cell.outputs if WIDGET_VIEW in out.get("data", {})]
    transcript = format_transcript(nb)
    # The transcript shows each bar as JupyterLab does when the cell is done, not as first drawn.
    assert transcript.count("100%|██████████|") == len(bars)
    assert "  0%|" not in transcript


def test_setup_cell_builds_the_model_once_into_the_cache(tmp_path):
    # Run by hand (no LLM_MAGIC_DEMO_MODEL), the first cell builds the model into a fixed cache
    # folder and reuses it: running it again writes nothing, and no temporary folder is left.
    import json
    import os
    import subprocess
    import sys

    nb = json.loads(QUICKSTART.read_text(encoding="utf-8"))
    setup = "".join(next(c for c in nb["cells"] if c["cell_type"] == "code")["source"])
    assert "LLM_MAGIC_DEMO_MODEL" in setup
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "LLM_MAGIC_DEMO_MODEL"}
    env.update(XDG_CACHE_HOME=str(tmp_path / "cache"), TMPDIR=str(scratch))
    runs = [subprocess.run([sys.executable, "-c", setup], env=env, capture_output=True, text=True, check=True) for _ in range(2)]
    model = tmp_path / "cache" / "llm_magic" / "demo-model"
    assert all(run.stdout.strip() == f"model: {model}" for run in runs)
    weights = model / "model.safetensors"
    before = weights.stat().st_mtime_ns
    subprocess.run([sys.executable, "-c", setup], env=env, capture_output=True, check=True)
    assert weights.stat().st_mtime_ns == before
    assert not list(scratch.iterdir()), "the setup cell left files in the temp dir"


def test_demo_model_is_built_once_and_reused(tmp_path):
    from support.demo import build_demo_model

    first = build_demo_model(tmp_path / "m")
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert build_demo_model(tmp_path / "m") == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp


def test_demo_runs_every_notebook():
    from support.demo import DEMO_NOTEBOOKS

    assert sorted(DEMO_NOTEBOOKS) == sorted(path.name for path in NOTEBOOK_PATHS)
