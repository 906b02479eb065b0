"""OOM rescue: a cell that dies of an out-of-memory error gets its memory back and an explanation.

The OOMs here are real `torch.OutOfMemoryError` objects raised by the cell (no GPU needed); the
memory is a real CPU tensor held by the failing function's frame. The last test makes a real
CUDA OOM and is skipped without a GPU.
"""

from __future__ import annotations

import gc
import pathlib
import sys
import weakref

import pytest
from cells import changed_names, hidden_ids, namespace_ids, run_text
from IPython.utils.capture import capture_output

from llm_magic.commands.oom_errors import find_oom, parse_oom_message
from llm_magic.ipython.hooks import OOMRescue
from llm_magic.ipython.shell_state import clear_exception_state

GIB = 1 << 30
OOM_TEXT = (
    "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.15 GiB of which 1.50 GiB "
    "is free. Including non-PyTorch memory, this process has 77.63 GiB memory in use. Of the allocated memory "
    "76.10 GiB is allocated by PyTorch, and 1.03 GiB is reserved by PyTorch but unallocated. If reserved but "
    "unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation."
)
HEADING = "Out of memory on cuda:0"

# A function whose frame holds 50 MB when it fails; `probe` gets a weak reference to the tensor.
FAILING_STEP = """
import torch, weakref
probe = []
def step(error):
    activations = torch.empty(12_500_000)  # 50 MB of float32
    probe.append(weakref.ref(activations))
    raise error
"""

FAILING_STEP_NATIVE = FAILING_STEP.replace("    raise error", "    torch.empty(1 << 50, dtype=torch.uint8)")


def _fresh_shell(kind):
    """A fresh shell of class `kind` without the extension, torn down after the test."""
    from IPython.core.interactiveshell import InteractiveShell

    InteractiveShell.clear_instance()
    for name in ("last_type", "last_value", "last_traceback", "last_exc"):
        if hasattr(sys, name):
            delattr(sys, name)
    ip = kind.instance()
    yield ip
    # Tests that leave a traceback alive (rescue off, other errors) must not leak its 50 MB
    # into later tests, where it would show as an unnamed holder.
    clear_exception_state(ip)
    ip.reset(new_session=False)
    kind.clear_instance()
    InteractiveShell.clear_instance()
    gc.collect()


@pytest.fixture
def bare_shell():
    """A fresh InteractiveShell without the extension: the rescue is registered by the test."""
    from IPython.core.interactiveshell import InteractiveShell

    yield from _fresh_shell(InteractiveShell)


@pytest.fixture
def kernel_shell():
    """A bare shell that render.show takes for a notebook kernel (it goes by the class name)."""
    from IPython.core.interactiveshell import InteractiveShell

    class ZMQInteractiveShell(InteractiveShell):
        pass

    yield from _fresh_shell(ZMQInteractiveShell)


@pytest.fixture
def rescue(bare_shell):
    switch = {"on": True}
    handler = OOMRescue(bare_shell, enabled=lambda: switch["on"])
    handler.register()
    handler.switch = switch
    yield handler
    handler.unregister()



def setup(shell, code):
    """Run a cell that must succeed (definitions, loads)."""
    result, output = run_text(shell, code)
    assert result.success, output[-2000:]


def fail_in_step(shell, error_code: str, *, native: bool = False):
    """Define `step`, then call it with the error `error_code` builds; return result and output.

    native: `step` fails the way an allocator does instead, in C++ (a 1 PiB CPU allocation).
    """
    setup(shell, FAILING_STEP_NATIVE if native else FAILING_STEP)
    shell.user_ns["OOM_TEXT"] = OOM_TEXT
    result, output = run_text(shell, f"step({error_code})")
    gc.collect()
    return result, output, shell.user_ns["probe"][0]


def test_oom_rescue_frees_only_the_failing_frames(bare_shell, rescue):
    """The user's names and output history are left as they were: only the locals of the frames
    that failed go (and with them the 50 MB tensor)."""
    import torch

    setup(bare_shell, FAILING_STEP)
    bare_shell.user_ns.update(OOM_TEXT=OOM_TEXT, kept=torch.ones(1000))
    run_text(bare_shell, "kept")  # Out[n] and `_` hold it too
    kept = weakref.ref(bare_shell.user_ns["kept"])
    before, hidden = namespace_ids(bare_shell), hidden_ids(bare_shell)
    result, _ = run_text(bare_shell, "step(torch.OutOfMemoryError(OOM_TEXT))")
    gc.collect()
    assert bare_shell.user_ns["probe"][0]() is None and rescue.last_explanation is not None
    assert changed_names(before, namespace_ids(bare_shell)) == set()
    assert hidden_ids(bare_shell) == hidden and kept() is bare_shell.user_ns["kept"]


def test_oom_frees_the_frames_tensor_and_explains_below_the_traceback(bare_shell, rescue):
    import torch

    result, output, probe = fail_in_step(bare_shell, "torch.OutOfMemoryError(OOM_TEXT)")
    assert probe() is None, "the 50 MB local of the failing frame is still alive"
    assert type(result.error_in_exec) is torch.OutOfMemoryError  # the cell's error is untouched
    assert str(result.error_in_exec) == OOM_TEXT
    # IPython's traceback first (with the failing line), then the explanation.
    assert "Traceback" in output and "raise error" in output
    assert output.index("raise error") < output.index(HEADING)
    assert "tried to allocate 2 GiB, 1.5 GiB was free of 79.1 GiB" in output
    assert "Freed now: 47.7 MiB cpu" in output and "frame `step()`, local `activations`" in output
    assert "%%llmload" in output and "max_new_tokens" in output
    explanation = rescue.last_explanation
    assert explanation.released.freed_bytes == {"cpu": 50_000_000}
    assert explanation.message.requested_bytes == 2 * GIB
    assert explanation.to_dict()["released"]["freed"] == ["frame `step()`, local `activations`"]


def test_native_allocator_runtime_error_triggers(bare_shell, rescue):
    # A real allocator failure: PyTorch's CPU allocator raises a plain RuntimeError from C++.
    result, output, probe = fail_in_step(bare_shell, "None", native=True)
    assert probe() is None
    assert type(result.error_in_exec) is RuntimeError
    assert "Out of memory on cpu: tried to allocate 1 PiB" in output
    assert "Freed now: 47.7 MiB cpu" in output
    assert "so %debug will not see them" in output and "LLMMagic.oom_rescue = False" in output


@pytest.mark.parametrize(
    "error_code",
    [
        "RuntimeError('cache ran out of memory')",
        "RuntimeError('CUDA error: out of memory')",  # the allocator's words, raised by user code
        "RuntimeError(OOM_TEXT)",
    ],
)
def test_user_runtime_errors_that_mention_memory_keep_their_frames(bare_shell, rescue, error_code):
    result, output, probe = fail_in_step(bare_shell, error_code)
    assert probe() is not None, "the rescue cleared the frames of a user's own error"
    assert HEADING not in output and "Freed now" not in output
    assert rescue.last_explanation is None


def test_oom_in_the_cause_chain_triggers(bare_shell, rescue):
    setup(bare_shell, FAILING_STEP)
    bare_shell.user_ns["OOM_TEXT"] = OOM_TEXT
    setup(bare_shell, (
        "import torch\n"
        "def wrap():\n"
        "    try:\n"
        "        step(torch.OutOfMemoryError(OOM_TEXT))\n"
        "    except RuntimeError as e:\n"
        "        raise ValueError('generation failed') from e\n"
    ))
    result, output = run_text(bare_shell, "wrap()")
    gc.collect()
    assert type(result.error_in_exec) is ValueError
    assert bare_shell.user_ns["probe"][0]() is None
    assert HEADING in output


@pytest.mark.parametrize("error_code", ["ValueError('out of memory')", "RuntimeError('shape mismatch')", "MemoryError()"])
def test_other_errors_are_left_alone(bare_shell, rescue, error_code):
    result, output, probe = fail_in_step(bare_shell, error_code)
    assert probe() is not None, "a frame of a non-OOM error was cleared"
    assert "Out of memory" not in output and rescue.last_explanation is None


def test_oom_caught_inside_the_cell_gets_no_explanation(bare_shell, rescue):
    setup(bare_shell, FAILING_STEP)
    bare_shell.user_ns["OOM_TEXT"] = OOM_TEXT
    result, output = run_text(
        bare_shell, "try:\n    step(torch.OutOfMemoryError(OOM_TEXT))\nexcept torch.OutOfMemoryError:\n    handled = True"
    )
    assert result.success and bare_shell.user_ns["handled"] is True
    assert "Out of memory" not in output and rescue.last_explanation is None


def test_disabled_rescue_does_nothing(bare_shell, rescue):
    rescue.switch["on"] = False
    result, output, probe = fail_in_step(bare_shell, "torch.OutOfMemoryError(OOM_TEXT)")
    assert probe() is not None  # the traceback still holds it, as IPython alone would
    assert "Out of memory" not in output


def test_copy_also_held_elsewhere_is_reported_not_freed(bare_shell, rescue):
    setup(bare_shell, FAILING_STEP + (
        "def step2(error):\n"
        "    kept.append(torch.empty(1_000_000))\n"
        "    x = kept[-1]\n"
        "    raise error\n"
        "kept = []\n"
    ))
    bare_shell.user_ns["OOM_TEXT"] = OOM_TEXT
    result, output = run_text(bare_shell, "step2(torch.OutOfMemoryError(OOM_TEXT))")
    assert bare_shell.user_ns["kept"][0].numel() == 1_000_000  # the user's list is untouched
    # `x` shares its storage with `kept[0]`, which the user names: not claimed by the frame.
    assert rescue.last_explanation.released.freed == ()
    assert "What holds memory now" in output
    assert [row.path for row in rescue.last_explanation.holders if row.kind == "named"][0].startswith("kept")


def test_explanation_lists_hidden_holders_and_kv_headroom(bare_shell, rescue, tiny_model):
    bare_shell.user_ns["_test_path"] = tiny_model
    setup(bare_shell, "from transformers import AutoModelForCausalLM\nmodel = AutoModelForCausalLM.from_pretrained(_test_path)")
    setup(bare_shell, "import torch\ntorch.ones(1_000_000)")  # a displayed tensor: only Out[n] and _ hold it
    result, output, _ = fail_in_step(bare_shell, "torch.OutOfMemoryError(OOM_TEXT)")
    explanation = rescue.last_explanation
    paths = [row.path for row in explanation.holders]
    assert "model" in paths and any(path.startswith("Out[") for path in paths)
    assert "%llmfree --hidden" in output
    (headroom,) = explanation.headroom  # a headroom.Headroom, as %%llmload reports it
    # tiny llama: 4 layers x K+V x 2 kv heads x head_dim 16 x 4 bytes (float32)
    assert headroom.name == "model" and headroom.device == "cpu" and headroom.dtype == "float32"
    assert headroom.bytes_per_token == 4 * 2 * 2 * 16 * 4
    (cpu,) = headroom.devices
    assert cpu.free_bytes and headroom.fits[0].tokens == cpu.free_bytes // headroom.bytes_per_token
    line = headroom.generation  # the simulated peak of generate, capped at the 256-token context
    assert line.whole_context and line.context_window == 256 and line.peak_bytes["cpu"] > 0
    assert "Generation headroom of model (float32, sdpa): fits: the full 256-token context at batch 1" in output


def test_rescue_failure_keeps_the_users_exception(bare_shell):
    import torch

    def broken_show(renderable):
        raise RuntimeError("display broke")

    handler = OOMRescue(bare_shell, show=broken_show)
    handler.register()
    try:
        result, output, _ = fail_in_step(bare_shell, "torch.OutOfMemoryError(OOM_TEXT)")
    finally:
        handler.unregister()
    # One line about our failure; the user's OOM stays the last exception (for %debug, %tb).
    assert "the out-of-memory rescue failed: RuntimeError: display broke" in output
    assert type(result.error_in_exec) is torch.OutOfMemoryError
    assert sys.last_value is result.error_in_exec


def test_explanation_shows_as_html_in_a_kernel_after_the_cell(kernel_shell):
    # post_run_cell runs after the cell, when IPython has taken the builtin `get_ipython` away
    # again (rich's notebook test): render.show asks IPython.get_ipython() instead, so the
    # explanation still comes out as HTML, not as ANSI text, and builtins stay untouched.
    import builtins

    handler = OOMRescue(kernel_shell)
    handler.register()
    try:
        setup(kernel_shell, FAILING_STEP)
        kernel_shell.user_ns["OOM_TEXT"] = OOM_TEXT
        with capture_output() as captured:
            kernel_shell.run_cell("step(torch.OutOfMemoryError(OOM_TEXT))", store_history=True)
    finally:
        handler.unregister()
    (bundle,) = [output.data for output in captured.outputs if "text/html" in output.data]
    assert 'class="llm-magic"' in bundle["text/html"] and HEADING in bundle["text/html"]
    assert HEADING in bundle["text/plain"] and "\x1b[" not in bundle["text/plain"]
    assert HEADING not in captured.stdout
    assert "get_ipython" not in builtins.__dict__


def test_parse_current_and_old_messages():
    now = parse_oom_message(OOM_TEXT)
    assert now.device == "cuda:0"
    assert now.requested_bytes == 2 * GIB and now.free_bytes == int(1.5 * GIB)
    assert now.total_bytes == int(79.15 * GIB) and now.allocated_bytes == int(76.10 * GIB)
    assert now.reserved_unallocated_bytes == int(1.03 * GIB)
    old = parse_oom_message(
        "CUDA out of memory. Tried to allocate 20.00 MiB (GPU 1; 7.79 GiB total capacity; 6.18 GiB already "
        "allocated; 18.75 MiB free; 6.21 GiB reserved in total by PyTorch)"
    )
    assert old.device == "cuda:1" and old.requested_bytes == 20 << 20
    assert old.total_bytes == int(7.79 * GIB) and old.free_bytes == int(18.75 * (1 << 20))
    assert old.reserved_unallocated_bytes == int(6.21 * GIB) - int(6.18 * GIB)
    small = parse_oom_message(
        "CUDA out of memory. Tried to allocate 512 bytes. GPU 0 has a total capacity of 1.00 KiB of which 0 bytes is free."
    )
    assert small.requested_bytes == 512 and small.free_bytes == 0 and small.total_bytes == 1024
    mps = parse_oom_message("MPS backend out of memory (MPS allocated: 1.20 GB). Tried to allocate 256.00 MB on private pool.")
    assert mps.device == "mps" and mps.requested_bytes == 256 << 20 and mps.free_bytes is None
    unknown = parse_oom_message("CUDA error: out of memory")
    assert unknown.device is None and unknown.requested_bytes is None


def test_find_oom_checks_real_types():
    import torch

    class Lying(Exception):
        __class__ = torch.OutOfMemoryError  # isinstance() would believe it

    assert find_oom(torch.OutOfMemoryError("x")) is not None
    assert find_oom(Lying("out of memory")) is None
    assert find_oom(ValueError("out of memory")) is None


def test_modules_never_pass_trust_remote_code():
    # They read the loaded model's config; they never load a config or a model themselves.
    package = pathlib.Path(__file__).resolve().parents[2] / "llm_magic"
    for name in ("commands/oom.py", "commands/oom_errors.py", "render/oom.py", "commands/watch.py"):
        source = (package / name).read_text()
        assert "trust_remote_code" not in source and "from_pretrained" not in source


def test_importing_the_modules_does_not_import_torch():
    import subprocess

    code = "import sys, llm_magic.commands.oom, llm_magic.commands.oom_errors, llm_magic.render.oom, llm_magic.commands.watch, llm_magic.ipython.hooks; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


# -- wired into the extension (LLMMagic.oom_rescue; load/unload register the rescue) ----------


def test_extension_rescues_by_default_and_config_turns_it_off(shell):
    result, output, probe = fail_in_step(shell, "torch.OutOfMemoryError(OOM_TEXT)")
    assert probe() is None and HEADING in output
    shell.run_line_magic("config", "LLMMagic.oom_rescue = False")
    result, output, probe = fail_in_step(shell, "torch.OutOfMemoryError(OOM_TEXT)")
    assert probe() is not None and "Out of memory" not in output
    shell.run_line_magic("config", "LLMMagic.oom_rescue = True")
    clear_exception_state(shell)  # the 50 MB the unrescued traceback holds: not for later tests


def test_unload_restores_post_run_cell_callbacks(shell):
    shell.run_line_magic("unload_ext", "llm_magic")
    before = list(shell.events.callbacks["post_run_cell"])
    shell.run_line_magic("load_ext", "llm_magic")
    # The OOM rescue, and guard mode's after-cell placement line.
    assert len(shell.events.callbacks["post_run_cell"]) == len(before) + 2
    shell.run_line_magic("unload_ext", "llm_magic")
    assert shell.events.callbacks["post_run_cell"] == before


# -- a real CUDA OOM --------------------------------------------------------------------------


@pytest.mark.gpu
def test_real_cuda_oom_gives_the_frames_memory_back(bare_shell, rescue):
    import torch

    # Something of ours stays on the device, so its free memory is measured (devices.py does
    # not query a device where PyTorch holds nothing: that could create a context).
    anchor = torch.ones(1, device="cuda")
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    setup(bare_shell, (
        "import torch\n"
        "def step():\n"
        "    held = torch.empty(1 << 30, dtype=torch.uint8, device='cuda')  # 1 GiB\n"
        "    total = torch.cuda.get_device_properties(0).total_memory\n"
        "    return torch.empty(2 * total, dtype=torch.uint8, device='cuda')\n"
    ))
    result, output = run_text(bare_shell, "step()")
    assert type(result.error_in_exec) is torch.OutOfMemoryError
    assert torch.cuda.memory_allocated() == baseline
    explanation = rescue.last_explanation
    assert explanation.device == "cuda:0" and explanation.released.freed_bytes.get("cuda:0") == 1 << 30
    assert explanation.free_bytes_now is not None and explanation.message.requested_bytes > 1 << 30
    assert "Freed now: 1 GiB cuda:0" in output
    del anchor
