"""Ctrl-C in the middle of a release or a load (all or nothing), the magics called outside
IPython, and back-to-back loads with gc disabled."""

from __future__ import annotations

import gc
import signal
import sys
import weakref

import pytest
from cells import changed_names, namespace_ids, ok, run
from cells import llmload as load
from hypothesis import given
from hypothesis import strategies as st
from IPython.utils.capture import capture_output
from support.hostile import (
    FAST,
    INTERRUPTING,
    dead,
)

from llm_magic.ipython.magics import LLMMagic

pytestmark = pytest.mark.usefixtures("frozen_imports")


# -- Ctrl-C ----------------------------------------------------------------------------------



@FAST
@given(count=st.integers(1, 5), data=st.data())
def test_ctrl_c_during_release_is_all_or_nothing(shell, count, data):
    """A Ctrl-C when the k-th object dies (weakref callback): every target is still released,
    hidden copies too, bystanders untouched, and the interrupt is reported, then raised."""
    ok(shell, INTERRUPTING)
    k = data.draw(st.integers(0, count - 1), label="interrupting target")
    shown = data.draw(st.lists(st.integers(0, count - 1), unique=True), label="also in Out")
    torch = sys.modules["torch"]
    names = [f"t{i}" for i in range(count)]
    for name in names:
        shell.user_ns[name] = torch.nn.Linear(4, 4)
    for index in shown:
        run(shell, names[index])
    refs = [weakref.ref(shell.user_ns[name]) for name in names]
    alarm = weakref.ref(shell.user_ns[names[k]], shell.user_ns["press_ctrl_c"])
    shell.user_ns["bystander"] = bystander = torch.ones(3)
    with capture_output() as captured, pytest.raises(KeyboardInterrupt):
        shell.run_line_magic("llmfree", " ".join(names))
    assert "Freed:" in captured.stdout  # the report was shown before the interrupt
    assert all(ref() is None for ref in refs) and alarm() is None  # freed inside the release
    assert not any(name in shell.user_ns for name in names)
    assert not any(isinstance(out, torch.nn.Linear) for out in shell.user_ns["Out"].values())
    assert shell.user_ns["bystander"] is bystander
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def no_escape(call, *args):
    """Call the engine directly; a KeyboardInterrupt escaping would end the pytest session."""
    try:
        return call(*args)
    except KeyboardInterrupt:
        pytest.fail("a KeyboardInterrupt escaped the release")


def test_ctrl_c_during_release_reports_interrupted(shell):
    from llm_magic.commands.llmfree import run_llmfree

    ok(shell, INTERRUPTING + "a = torch.nn.Linear(4, 4)\nb = torch.nn.Linear(4, 4)\nalarm = weakref.ref(a, press_ctrl_c)\n")
    refs = [weakref.ref(shell.user_ns["a"]), weakref.ref(shell.user_ns["b"])]
    result = no_escape(run_llmfree, shell, ["a", "b"])
    assert result.interrupted and result.all_freed and dead(*refs)


def test_ctrl_c_before_the_release_changes_nothing(shell):
    """Ctrl-C while names are still being resolved (a property on the way): nothing released."""
    ok(
        shell,
        INTERRUPTING
        + "class Box:\n"
        "    def __init__(self):\n"
        "        self._model = torch.nn.Linear(4, 4)\n"
        "    @property\n"
        "    def model(self):\n"
        "        press_ctrl_c()\n"
        "        return self._model\n"
        "first = torch.nn.Linear(4, 4)\n"
        "box = Box()\n",
    )
    before = dict(shell.user_ns)
    names = namespace_ids(shell)
    inside = weakref.ref(shell.user_ns["box"]._model)
    for cell in ("%llmfree first box.model", "%%llmload name\nfirst = 1\nbox.model = 2"):
        result, captured = run(shell, cell)
        assert isinstance(result.error_in_exec, KeyboardInterrupt)
        assert shell.user_ns["first"] is before["first"] and shell.user_ns["box"] is before["box"]
        assert "Released" not in captured.stdout
        assert changed_names(names, namespace_ids(shell)) == set() and inside() is shell.user_ns["box"]._model


def test_ctrl_c_during_llmload_release_stops_before_the_body(shell):
    ok(shell, INTERRUPTING + "ran = []\nmodel = torch.nn.Linear(4, 4)\nalarm = weakref.ref(model, press_ctrl_c)\n")
    old = weakref.ref(shell.user_ns["model"])
    result, captured = run(shell, "%%llmload name\nran.append(1)\nmodel = torch.nn.Linear(4, 4)")
    assert isinstance(result.error_in_exec, KeyboardInterrupt)
    assert shell.user_ns["ran"] == [] and "model" not in shell.user_ns  # released, not reloaded
    assert dead(old)
    assert "freed" in captured.stdout


def test_ctrl_c_during_the_engines_gc_is_not_lost(shell):
    from llm_magic.commands.llmfree import run_llmfree

    ok(shell, INTERRUPTING + "cyclic = CtrlCWhenCollected()\nprobe = weakref.ref(cyclic)\n")
    gc.collect()
    result = no_escape(run_llmfree, shell, ["cyclic"])
    assert dead(shell.user_ns["probe"]) and result.all_freed
    assert result.interrupted


def test_ctrl_c_during_llmload_gc_does_not_run_the_body(shell):
    ok(shell, INTERRUPTING + "ran = []\nmodel = CtrlCWhenCollected()\n")
    result, captured = run(shell, "%%llmload name\nran.append(1)\nmodel = torch.nn.Linear(4, 4)")
    assert isinstance(result.error_in_exec, KeyboardInterrupt)
    assert shell.user_ns["ran"] == []


def test_body_interrupted_mid_load(shell, tiny_model):
    load(shell, tiny_model)
    old = weakref.ref(shell.user_ns["model"])
    body = (
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "tokenizer = AutoTokenizer.from_pretrained(MODEL_NAME)\n"
        "raise KeyboardInterrupt\n"
        "model = AutoModelForCausalLM.from_pretrained(MODEL_NAME)\n"
    )
    result, captured = load(shell, tiny_model, body)
    assert isinstance(result.error_in_exec, KeyboardInterrupt)
    assert dead(old)  # released before the body ran: not resurrected, not half there
    assert "model" not in shell.user_ns and "tokenizer" in shell.user_ns
    assert shell.user_ns["MODEL_NAME"] == tiny_model
    assert captured.stdout.index("Released") < captured.stdout.index("KeyboardInterrupt")


def test_interrupt_inside_from_pretrained_leaves_nothing_behind(shell, tiny_model, monkeypatch):
    """Ctrl-C inside the default loader after the weights are in memory: `model` is not bound,
    the half-loaded model survives only in the traceback, and `%llmfree --hidden` frees it."""
    import transformers

    loaded = []
    original = transformers.AutoModelForCausalLM.from_pretrained

    def interrupted_load(*args, **kwargs):
        model = original(*args, **kwargs)
        loaded.append(weakref.ref(model))
        raise KeyboardInterrupt

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", interrupted_load)
    shell.user_ns["_test_path"] = tiny_model
    result, captured = run(shell, "%llmload $_test_path")
    assert isinstance(result.error_in_exec, KeyboardInterrupt)
    assert "model" not in shell.user_ns and "tokenizer" in shell.user_ns
    gc.collect()
    assert loaded[0]() is not None  # the traceback keeps it: a hidden holder
    freed = ok(shell, "%llmfree --hidden -o")
    assert any("last traceback" in item.label for item in freed.released)
    assert dead(loaded[0])


# -- outside IPython -------------------------------------------------------------------------

def _outside_calls():
    import llm_magic
    from llm_magic.commands.llmfree import run_llmfree
    from llm_magic.commands.llmload import LoadOptions, run_llmload

    return {
        "load_ipython_extension(None)": lambda: llm_magic.load_ipython_extension(None),
        "LLMMagic(shell=None).llmfree('x')": lambda: LLMMagic(shell=None).llmfree("x"),
        "LLMMagic(shell=None).llmfree('--all')": lambda: LLMMagic(shell=None).llmfree("--all"),
        "LLMMagic(shell=None).llmload('x')": lambda: LLMMagic(shell=None).llmload("x"),
        "LLMMagic(shell=None).llmload('x', body)": lambda: LLMMagic(shell=None).llmload("x", "model = 1"),
        "run_llmfree(None, ['x'])": lambda: run_llmfree(None, ["x"]),
        "run_llmfree(None, [], everything=True)": lambda: run_llmfree(None, [], everything=True),
        "run_llmload(None, ...)": lambda: run_llmload(None, LoadOptions("x"), "model = 1"),
    }


@pytest.mark.parametrize("call", list(_outside_calls()))
def test_outside_ipython_is_a_clear_error(call):
    with pytest.raises(Exception) as info:
        _outside_calls()[call]()
    assert not isinstance(info.value, AttributeError), repr(info.value)
    assert "ipython" in str(info.value).lower() or "shell" in str(info.value).lower()


def test_unload_outside_ipython_is_a_no_op():
    import llm_magic

    llm_magic.unload_ipython_extension(None)


# -- gc disabled -----------------------------------------------------------------------------


def test_back_to_back_loads_with_gc_disabled(shell, tiny_model):
    load(shell, tiny_model)
    ok(shell, "class Cyclic:\n    pass\nholder = Cyclic()\nholder.me = holder\nholder.model = model\ndel holder")
    refs = [weakref.ref(shell.user_ns["model"])]
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(2):
            result, captured = load(shell, tiny_model)
            assert result.success, captured.stdout
            assert result.result.released.all_freed
            # no gc.collect() here: the engine's own collection must have freed it
            assert all(ref() is None for ref in refs)
            refs = [weakref.ref(shell.user_ns["model"])]
        assert not gc.isenabled()  # the engine collects; it does not turn gc back on
    finally:
        if was_enabled:
            gc.enable()
