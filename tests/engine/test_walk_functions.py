"""Holders inside functions are named as the user would write them: default arguments, closure
cells (with the free variable's name), bound methods, `functools.partial` arguments. A function's
globals (the namespace) and code are never walked. "Reachable from no name" only when true."""

from __future__ import annotations

import weakref

import pytest
from cells import llmload as load
from cells import ok, run

HOLDERS = {
    "gen = lambda prompt, m=model: m\n": "gen.__defaults__[0]",
    "def gen(prompt, *, m=model):\n    return m\n": "gen.__kwdefaults__['m']",
    "def make(m):\n    return lambda prompt: m\ngen = make(model)\n": "gen.__closure__[0].cell_contents (closure `m`)",
    "import functools\ngen = functools.partial(print, model)\n": "gen.args[0]",
    "class Runner:\n    def __init__(self, m):\n        self.m = m\n    def go(self):\n        return self.m\ngen = Runner(model).go\n": "gen.__self__.m",
    "def gen():\n    pass\ngen.model = model\n": "gen.model",
}


@pytest.mark.parametrize("holder", list(HOLDERS), ids=list(HOLDERS.values()))
def test_function_holders_are_named(shell, tiny_model, holder):
    load(shell, tiny_model)
    ok(shell, holder)
    expected = HOLDERS[holder]
    old = weakref.ref(shell.user_ns["model"])

    state = ok(shell, "%gpustate --all -o")
    assert {row.path: row.kind for row in state.holders.rows}.get("model") == "named"
    result, captured = load(shell, tiny_model)  # `model` is rebound: `gen` still holds the old one
    [item] = result.result.released.released
    assert not item.freed and old() is not None
    assert item.held_by[0] == expected, item.held_by
    assert expected in captured.stdout

    state = ok(shell, "%gpustate --all -o")
    rows = {row.path: row for row in state.holders.rows}
    assert rows[expected].kind == "named" and rows[expected].type_name == "LlamaForCausalLM"
    # (Libraries may hold tiny unnamed tensors of their own: peft's `HadaWeight.forward` has a
    # `torch.tensor(1)` default. What matters is that the model is not one of them.)
    deep = ok(shell, "%gpustate --all --deep -o").holders.rows
    assert not any(row.kind == "unnamed" and row.type_name == "LlamaForCausalLM" for row in deep)

    freed = ok(shell, "%llmfree gen -o")
    assert freed.released[0].freed and old() is None


def test_closure_holder_listed_under_its_name_by_gpustate(shell, tiny_model):
    load(shell, tiny_model)
    ok(shell, "def make(m):\n    return lambda prompt: m\nkeeper = make(model)\ndel model")
    state = ok(shell, "%gpustate -o")
    rows = {row.path: row.kind for row in state.holders.rows}
    assert rows == {"keeper.__closure__[0].cell_contents (closure `m`)": "named"}
    assert not any("no name reaches it" in flag for flag in state.flags)


def test_function_globals_are_not_walked(shell):
    """A function defined in the notebook reaches the whole namespace through `__globals__`."""
    ok(shell, "import torch\nweights = torch.zeros(100_000)\ndef use():\n    return weights\n")
    state = ok(shell, "%gpustate --all -o")
    assert [row.path for row in state.holders.rows] == ["weights"]
    dry = ok(shell, "%llmfree use --dry-run -o")
    assert dry.released[0].bytes_by_device == {}


def test_unnamed_only_when_no_name_reaches_it(shell, tiny_model):
    """An lru_cache keeps its arguments where no path reaches them: that is "unnamed"."""
    load(shell, tiny_model)
    ok(shell, "import functools\n@functools.lru_cache\ndef cached(m):\n    return 1\ncached(model)\n")
    result, _ = load(shell, tiny_model)
    [item] = result.result.released.released
    assert not item.freed
    assert item.held_by[0].startswith("unnamed: reachable from no name"), item.held_by
    run(shell, "cached.cache_clear()")


def test_closure_path_pasted_from_the_report_frees_the_model(shell, tiny_model):
    load(shell, tiny_model)
    ok(shell, "def make(m):\n    return lambda prompt: m\nkeeper = make(model)\ndel model")
    [row] = ok(shell, "%gpustate -o").holders.rows
    old = weakref.ref(shell.user_ns["keeper"].__closure__[0].cell_contents)
    freed = ok(shell, f"%llmfree {row.path} -o")  # as shown: "... (closure `m`)"
    assert freed.released[0].freed and old() is None
    assert "keeper" in shell.user_ns  # only the cell's reference was dropped
