"""A busy notebook: a list of a million small items (a tokenized dataset) bound to a name,
before or after the models. Nothing tensor-holding is missed because that list is big: each
name's walk has its own budget, the list's walk is cut, and every report says so by name."""

from __future__ import annotations

import weakref

import pytest
from cells import ok, run

pytestmark = pytest.mark.usefixtures("frozen_imports")

BIG = "big = [[i] for i in range(1_000_000)]\n"
MODELS = (
    "from transformers import AutoModelForCausalLM\n"
    "model = AutoModelForCausalLM.from_pretrained(_test_path)\n"
    "best = AutoModelForCausalLM.from_pretrained(_test_path)\n"
    "runs = {'best': best, 'alias': model}\n"
    "del best\n"
)
CUT_NOTE = "stopped early in big"


@pytest.fixture(params=["list first", "models first"])
def busy(request, shell, tiny_model):
    shell.user_ns["_test_path"] = tiny_model
    ok(shell, BIG + MODELS if request.param == "list first" else MODELS + BIG)
    return shell


def test_gpustate_names_every_model_and_says_where_it_stopped(busy):
    result, captured = run(busy, "%gpustate --all -o")
    state = result.result
    rows = {row.path: row for row in state.holders.rows}
    assert rows["model"].is_model and rows["runs['best']"].is_model
    assert state.holders.cut == ("big",) and state.holders.truncated
    assert CUT_NOTE in captured.stdout and "%gpustate --deep" in captured.stdout


def test_llmfree_names_the_holder_past_the_big_list(busy):
    old = weakref.ref(busy.user_ns["model"])
    result, captured = run(busy, "%llmfree model -o")
    [item] = result.result.released
    assert not item.freed and old() is not None
    assert item.held_by[0] == "runs['alias']", item.held_by


def test_llmload_kept_list_names_the_models_and_the_cut(busy):
    result, captured = run(busy, "%%llmload name -o\nimport torch\nlinear = torch.nn.Linear(2, 2)")
    report = result.result
    assert {"model", "runs['best']"} <= {row.path for row in report.kept}
    assert report.kept_cut == ("big",) and report.to_dict()["kept_cut"] == ["big"]
    assert CUT_NOTE in captured.stdout


def test_a_model_inside_the_big_list_is_not_called_unnamed(shell, tiny_model):
    """Only the big list holds it: the release says where the search stopped (not "no name
    reaches it"), and `%gpustate --deep`, which the message advises, names it."""
    shell.user_ns["_test_path"] = tiny_model
    ok(shell, BIG + MODELS + "big.append(model)\n")
    old = weakref.ref(shell.user_ns["model"])
    result, captured = run(shell, "%llmfree model runs -o")
    model_item = result.result.released[0]
    assert not model_item.freed and old() is not None
    [reason] = model_item.held_by
    assert reason.startswith("not found: the search stopped early in big") and "%gpustate --deep" in reason
    assert "reachable from no name" not in reason

    shallow = ok(shell, "%gpustate --all -o")
    assert "big[1000000]" not in {row.path for row in shallow.holders.rows}
    deep = ok(shell, "%gpustate --all --deep -o")
    rows = {row.path: row for row in deep.holders.rows}
    assert rows["big[1000000]"].kind == "named" and rows["big[1000000]"].is_model
    assert deep.holders.cut == () and not any(row.kind == "unnamed" for row in deep.holders.rows)
    assert not any("%llmfree --hidden" in flag for flag in deep.flags + shallow.flags)


def test_llmfree_all_says_which_names_it_searched_only_in_part(shell, tiny_model):
    shell.user_ns["_test_path"] = tiny_model
    ok(shell, BIG + MODELS + "big.append(runs.pop('alias'))\n")
    result, captured = run(shell, "%llmfree --all --dry-run -o")
    assert {item.label for item in result.result.released} == {"model", "runs"}
    assert result.result.cut == ("big",)
    assert "Searched only in part (too many objects): big" in captured.stdout
