"""Watch mode: a line when a model appears, a warning (once) when only hidden copies hold memory.

CPU-only here: the stale-copy tests watch "cpu" memory through `stale_device`, which is the same
code path as accelerator memory on a GPU machine; the default (accelerators only) is tested to
stay silent, and not even scan, on this machine.
"""

from __future__ import annotations

import functools
import gc

import pytest
from cells import run as run_cell

from llm_magic.ipython.hooks import Watcher
from llm_magic.names import is_accelerator

# Every cell here must succeed unless the test says `fails=True`.
run = functools.partial(run_cell, fails=False)

TENSOR = "torch.ones(1_234_567)"  # 4.71 MiB of float32: above the 1 MiB warning threshold
SIZE = "4.71 MiB"


def about(lines, *parts):
    """The lines that mention every part: other tests may leave stale tensors in this process,
    and the watcher rightly reports them as unnamed copies."""
    return [line for line in lines if all(part in line for part in parts)]


@pytest.fixture
def lines():
    return []


def watcher_for(shell, lines, **options):
    watcher = Watcher(shell, show=lines.append, **options)
    watcher.start()
    return watcher


@pytest.fixture
def cpu_watcher(shell, lines):
    """Watches cpu memory for stale copies (the accelerator path, testable without one)."""
    watcher = watcher_for(shell, lines, stale_device=lambda device: device == "cpu")
    yield watcher
    watcher.stop()



def load(shell, path, name="model"):
    shell.user_ns["_test_path"] = path
    run(shell, f"from transformers import AutoModelForCausalLM\n{name} = AutoModelForCausalLM.from_pretrained(_test_path)")


def test_loading_and_rebinding_a_model_prints_one_line_each(shell, lines, tiny_model):
    watcher = watcher_for(shell, lines)
    run(shell, "import torch")
    load(shell, tiny_model)
    assert len(lines) == 1 and lines[0].startswith("model (LlamaForCausalLM, ") and lines[0].endswith(" cpu")
    assert "⚠" not in lines[0]  # all on cpu, no accelerator: nothing slower is available
    run(shell, "x = 1")
    run(shell, "model")  # displayed, not rebound
    run(shell, "alias = model")  # the same model under another name: not news
    assert len(lines) == 1
    load(shell, tiny_model)  # a new object under the same name
    assert len(lines) == 2 and lines[1].startswith("model (LlamaForCausalLM, ")
    run(shell, "model.half()")  # moved or cast in place: same object, new placement
    assert len(lines) == 3 and "model (LlamaForCausalLM, " in lines[2]
    watcher.stop()


def test_pipeline_like_object_reports_its_model(shell, lines, tiny_model):
    watcher = watcher_for(shell, lines)
    run(shell, "class Pipe:\n    pass\npipe = Pipe()")
    load(shell, tiny_model, "pipe.model")
    assert len(lines) == 1 and lines[0].startswith("pipe.model (LlamaForCausalLM, ")
    watcher.stop()


def test_models_already_loaded_at_start_are_the_baseline(shell, lines, tiny_model):
    load(shell, tiny_model)
    watcher = watcher_for(shell, lines)
    run(shell, "y = 2")
    assert lines == []
    watcher.stop()


def test_slow_tier_is_flagged(shell, lines, tiny_model):
    watcher = watcher_for(shell, lines)
    shell.user_ns["_test_path"] = tiny_model
    run(shell, (
        "from transformers import AutoModelForCausalLM\n"
        "model = AutoModelForCausalLM.from_pretrained(_test_path, device_map='auto', max_memory={'cpu': 400_000})"
    ))
    (line,) = lines
    assert " disk" in line and line.endswith("⚠ slower tier: disk")  # disk is slow even with no GPU
    watcher.stop()


def test_cells_not_touching_models_print_nothing_and_do_not_scan(shell, lines, cpu_watcher, tiny_model):
    load(shell, tiny_model)
    lines.clear()
    scans = cpu_watcher.scans
    for cell in ("x = 1", "y = [1, 2, 3]\ny", "def f():\n    return 1\nf()", "import math\nmath.pi", "z = {'a': 1}"):
        output = run(shell, cell)[1].stdout
        assert "⚠" not in output
    run(shell, "1 / 0", fails=True)  # an error whose frames hold no tensor
    assert lines == []
    assert cpu_watcher.scans == scans, "a cell that touched no tensor ran the holder scan"


def test_output_only_copy_warns_once_with_the_fix(shell, lines, cpu_watcher):
    run(shell, f"import torch\nt = {TENSOR}")
    run(shell, "t")  # Out[n] holds it, but so does `t`: not stale
    assert about(lines, SIZE) == []
    run(shell, "del t")  # now only the output history holds it
    (warning,) = about(lines, SIZE)
    assert warning.startswith(f"⚠ {SIZE} cpu held only by Out[") and "(Tensor)" in warning
    assert warning.endswith("%llmfree --hidden")
    for cell in ("x = 1", "x = 2", f"u = {TENSOR}\nu", "del u"):  # the last two scan again
        run(shell, cell)
    # u's copy, once; t's not again.
    assert len(about(lines, SIZE)) == 2 and about(lines, SIZE)[1] != warning
    shell.run_line_magic("llmfree", "--hidden")
    run(shell, f"v = {TENSOR}\nv")
    assert len(about(lines, SIZE)) == 2


def test_a_rebound_models_output_copy_warns(shell, lines, tiny_model):
    # The tiny model (706 KiB) is below the default 1 MiB threshold.
    run(shell, "%llmguard off")  # guard mode would release the old copy first: this is about finding one
    watcher = watcher_for(shell, lines, stale_device=lambda device: device == "cpu", min_stale_bytes=1 << 10)
    load(shell, tiny_model)
    run(shell, "model")
    load(shell, tiny_model)  # the old model lives on in Out[n]
    assert [line.split(" ")[0] for line in lines if not line.startswith("⚠")] == ["model", "model"]
    (warning,) = about(lines, "Out[", "(LlamaForCausalLM)")
    assert warning.startswith("⚠ 706 KiB cpu held only by Out[")
    assert warning.endswith("%llmfree --hidden")
    watcher.stop()


def test_traceback_copy_warns_once(shell, lines, cpu_watcher):
    run(shell, f"import torch\ndef step():\n    activations = {TENSOR}\n    raise ValueError('shape mismatch')")
    run(shell, "step()", fails=True)
    (warning,) = about(lines, SIZE)
    assert "held only by last traceback, frame `step()`, local `activations`" in warning
    run(shell, "x = 1")
    assert len(about(lines, SIZE)) == 1
    run(shell, "step()", fails=True)  # a new failure: a new copy, at the same path
    assert len(about(lines, SIZE)) == 2


def test_unnamed_copy_warns_without_the_hidden_fix(shell, lines, tiny_model):
    watcher = watcher_for(shell, lines, stale_device=lambda device: device == "cpu", min_stale_bytes=1 << 10)
    load(shell, tiny_model)
    # only an lru_cache's C-level cache holds it now: no path from a name reaches it (a closure
    # would: `keep.__closure__[0].cell_contents` is a name the walk follows)
    run(shell, "import functools\nkeep = functools.lru_cache(lambda m: m.config)\nkeep(model)\ndel model")
    (warning,) = about(lines, "unnamed LlamaForCausalLM")
    assert warning.startswith("⚠ 706 KiB cpu held by unnamed LlamaForCausalLM at 0x")
    assert "gc.collect() did not free" in warning and "%llmfree --hidden" not in warning
    run(shell, "x = 1")
    run(shell, f"import torch\n{TENSOR}[:1]")  # a scan of named and hidden holders only
    load(shell, tiny_model, "other")
    run(shell, "other_alias = other\ndel other")  # a dropped, live model: unnamed copies searched again
    assert watcher.scans == 3
    assert len(about(lines, "unnamed LlamaForCausalLM")) == 1
    watcher.stop()


def test_dropped_model_in_a_reference_cycle_is_garbage_not_a_copy(shell, lines, tiny_model):
    watcher = watcher_for(shell, lines, stale_device=lambda device: device == "cpu", min_stale_bytes=1 << 10)
    load(shell, tiny_model)
    run(shell, "import weakref\nmodel.cycle = [model]\nprobe = weakref.ref(model)")
    gc.disable()  # else an automatic collection during the cell may free the cycle first
    try:
        run(shell, "del model")  # alive in its cycle until gc runs, like a dispatched model
    finally:
        gc.enable()
    assert about(lines, "⚠", "LlamaForCausalLM") == [] and watcher.scans == 1
    assert shell.user_ns["probe"]() is None
    watcher.stop()


def test_default_watches_accelerators_only(shell, lines):
    watcher = watcher_for(shell, lines)
    assert watcher.watch.stale_device is is_accelerator
    run(shell, f"import torch\nt = {TENSOR}\nt")
    run(shell, "del t")
    assert lines == [] and watcher.scans == 0  # no accelerator in use: no scan at all
    watcher.stop()


def test_off_stops_it(shell, lines, tiny_model):
    watcher = watcher_for(shell, lines)
    assert watcher.active
    watcher.stop()
    assert not watcher.active
    load(shell, tiny_model)
    assert lines == []


def test_without_torch_nothing_runs(shell, lines):
    # The watcher never imports torch; in this process torch is usually loaded already, so
    # the check is made in a subprocess.
    import subprocess
    import sys

    code = (
        "from IPython.core.interactiveshell import InteractiveShell\n"
        "from llm_magic.ipython.hooks import Watcher\n"
        "ip = InteractiveShell.instance(); lines = []\n"
        "w = Watcher(ip, show=lines.append); w.start()\n"
        "ip.run_cell('x = 1'); ip.run_cell('x'); ip.run_cell('del x')\n"
        "import sys; print('torch' in sys.modules, lines, w.scans)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False [] 0"


def test_watch_keeps_no_model_alive(shell, lines, tiny_model):
    import weakref

    watcher = watcher_for(shell, lines)
    load(shell, tiny_model)
    ref = weakref.ref(shell.user_ns["model"])
    run(shell, "del model")
    gc.collect()
    assert ref() is None
    watcher.stop()


# -- wired into the extension: the %llmwatch magic -------------------------------------------


def test_llmwatch_magic_on_off_and_unload(shell, tiny_model):
    run(shell, "%llmguard off")  # guard mode prints the same placement line when watch is off
    callbacks = list(shell.events.callbacks["post_run_cell"])
    output = run(shell, "%llmwatch on")[1].stdout
    assert "on" in output and len(shell.events.callbacks["post_run_cell"]) == len(callbacks) + 1
    load(shell, tiny_model)
    output = run(shell, "model = AutoModelForCausalLM.from_pretrained(_test_path)")[1].stdout
    assert output.count("model (LlamaForCausalLM, ") == 1
    output = run(shell, "%llmwatch off")[1].stdout
    assert shell.events.callbacks["post_run_cell"] == callbacks
    output = run(shell, "model = AutoModelForCausalLM.from_pretrained(_test_path)")[1].stdout
    assert "LlamaForCausalLM" not in output
    run(shell, "%llmwatch on")
    shell.run_line_magic("unload_ext", "llm_magic")  # stops watching too
    assert all("Watcher" not in repr(callback) for callback in shell.events.callbacks["post_run_cell"])
