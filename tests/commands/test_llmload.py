"""`%%llmload` end to end in a real InteractiveShell, with real tiny transformers models.

Every claim that memory was freed is proven with a weak reference to the old model.
"""

from __future__ import annotations

import functools
import gc
import sys
import weakref

import pytest
from cells import LOAD, llmload, run
from IPython.utils.capture import capture_output

# A %%llmload cell as a notebook runs it, without -o unless asked.
load = functools.partial(llmload, options="")



def old_model_ref(shell, name="model"):
    return weakref.ref(shell.user_ns[name])


def test_load_binds_model_name_and_reports_placement(shell, tiny_model):
    result, captured = load(shell, tiny_model)
    assert result.success, captured.stdout
    assert shell.user_ns["MODEL_NAME"] == tiny_model
    assert type(shell.user_ns["model"]).__name__ == "LlamaForCausalLM"
    assert "LlamaForCausalLM" in captured.stdout and "cpu" in captured.stdout


def test_reload_frees_old_model(shell, tiny_model):
    load(shell, tiny_model)
    old = old_model_ref(shell)
    result, captured = load(shell, tiny_model, options="-o")
    gc.collect()
    assert old() is None
    report = result.result
    assert [item.label for item in report.released.released] == ["model"]
    assert report.released.released[0].freed
    assert report.released.freed_bytes["cpu"] > 0
    assert shell.user_ns["model"] is not None


def test_reload_frees_model_held_by_output_history(shell, tiny_model):
    load(shell, tiny_model)
    run(shell, "model")  # displayed: Out[n], _n and _ now hold it
    old = old_model_ref(shell)
    number = max(shell.user_ns["Out"])
    assert shell.user_ns["Out"][number] is old()
    result, _ = load(shell, tiny_model, options="-o")
    gc.collect()
    assert old() is None
    cleared = result.result.released.released[0].cleared
    assert f"Out[{number}]" in cleared and f"_{number}" in cleared and "_" in cleared


def test_reload_frees_model_held_by_underscore_chain(shell, tiny_model):
    load(shell, tiny_model)
    run(shell, "model")
    run(shell, "1")
    run(shell, "2")  # now the model sits in ___ and in the displayhook's ___
    old = old_model_ref(shell)
    assert shell.user_ns["___"] is old()
    load(shell, tiny_model)
    gc.collect()
    assert old() is None
    assert shell.displayhook.___ is not shell.user_ns["model"]


def test_reload_frees_model_held_by_last_traceback(shell, tiny_model):
    load(shell, tiny_model)
    result, _ = run(shell, "def step(m):\n    raise RuntimeError('shape mismatch (simulated)')\nstep(model)")
    assert not result.success
    old = old_model_ref(shell)
    assert sys.last_traceback is not None
    result, _ = load(shell, tiny_model, options="-o")
    gc.collect()
    assert old() is None
    assert "last traceback" in result.result.released.released[0].cleared
    assert getattr(sys, "last_traceback", None) is None


def test_reload_frees_model_held_by_last_execution_result(shell, tiny_model):
    load(shell, tiny_model)
    run(shell, "model")
    old = old_model_ref(shell)
    assert shell.last_execution_result.result is old()
    # Clear the visible output history by hand, as `%reset -f out` would (it misses some).
    shell.run_line_magic("reset", "-f out")
    result, captured = load(shell, tiny_model, options="-o")
    gc.collect()
    assert old() is None
    # Said as the user would, like "last traceback": not IPython's attribute name.
    assert "last result" in result.result.released.released[0].cleared
    assert "last_execution_result" not in captured.stdout


def test_traceback_and_output_together(shell, tiny_model):
    load(shell, tiny_model)
    run(shell, "model")
    run(shell, "def step(m):\n    local_copy = m\n    raise ValueError('boom')\nstep(model)")
    old = old_model_ref(shell)
    load(shell, tiny_model)
    gc.collect()
    assert old() is None


def test_survivor_is_named_not_reported_freed(shell, tiny_model):
    load(shell, tiny_model)
    run(shell, "class Result:\n    def __init__(self, model):\n        self.model = model\nresults = [Result(model)]")
    old = old_model_ref(shell)
    result, captured = load(shell, tiny_model, options="-o")
    item = result.result.released.released[0]
    assert not item.freed
    assert "results[0].model" in item.held_by
    assert old() is shell.user_ns["results"][0].model  # we never touch what we were not asked to
    assert "NOT freed" in captured.stdout and "results[0].model" in captured.stdout
    assert any("results[0].model" in w for w in result.result.warnings)


def test_optimizer_holder_is_named(shell, tiny_model):
    load(shell, tiny_model)
    run(shell, "import torch\nopt = torch.optim.SGD(model.parameters(), lr=0.1)")
    result, _ = load(shell, tiny_model, options="-o")
    item = result.result.released.released[0]
    assert not item.freed  # the optimizer still holds the parameters, not the module...
    assert any(path.startswith("opt.param_groups[0]['params']") for path in item.held_by)


def test_other_models_are_kept_and_listed(shell, tiny_model):
    load(shell, tiny_model)
    run(shell, "other = model")
    run(shell, "del model")
    kept = old_model_ref(shell, "other")
    result, captured = load(shell, tiny_model, options="-o")
    gc.collect()
    assert kept() is shell.user_ns["other"]
    assert [h.path for h in result.result.kept] == ["other"]
    assert "%llmfree" in captured.stdout


def test_release_all_releases_other_models(shell, tiny_model):
    load(shell, tiny_model)
    run(shell, "other = model\ndel model")
    old = old_model_ref(shell, "other")
    result, _ = load(shell, tiny_model, options="--release-all -o")
    gc.collect()
    assert old() is None
    assert "other" not in shell.user_ns
    assert result.result.kept == ()


def test_tuple_attribute_and_subscript_targets(shell, tiny_model):
    run(shell, "class Box: pass\nbox = Box()\ncache = {}")
    body = (
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "tok, model = AutoTokenizer.from_pretrained(MODEL_NAME), AutoModelForCausalLM.from_pretrained(MODEL_NAME)\n"
        "box.model = model\n"
        "cache['m'] = model\n"
    )
    load(shell, tiny_model, body)
    old = old_model_ref(shell)
    result, _ = load(shell, tiny_model, body, options="-o")
    gc.collect()
    assert old() is None
    # the same object under three targets is released once, under its first name, and all
    # three references are dropped
    [item] = result.result.released.released
    assert item.label == "model" and item.freed
    assert {"model", "box.model", "cache['m']"} <= set(item.cleared)


def test_empty_body_loads_tokenizer_and_model(shell, tiny_model):
    shell.user_ns["_test_path"] = tiny_model
    with capture_output():
        shell.run_line_magic("llmload", "$_test_path --dtype float32")
    assert type(shell.user_ns["model"]).__name__ == "LlamaForCausalLM"
    assert shell.user_ns["tokenizer"]("w1 w2")["input_ids"]
    old = old_model_ref(shell)
    with capture_output():
        shell.run_line_magic("llmload", "$_test_path --model-var lm --no-tokenizer")
    assert "lm" in shell.user_ns and old() is shell.user_ns["model"]  # `model` was not a target


def test_empty_body_default_does_not_trust_remote_code(shell, tiny_model, monkeypatch):
    import transformers

    seen = {}
    original = transformers.AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.update(kwargs)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    with capture_output():
        shell.run_line_magic("llmload", f"{tiny_model} --no-tokenizer")
    assert seen["trust_remote_code"] is False


@pytest.mark.parametrize(
    "line, body, message",
    [
        ("--bogus", LOAD, "unrecognized arguments"),
        ("", LOAD, "needs a MODEL_NAME"),
        ("$_test_path", "model = (\n", "syntax error"),
        ("$_test_path --dtype float77", "", "unknown dtype"),
    ],
)
def test_bad_input_is_one_line_and_changes_nothing(shell, tiny_model, line, body, message):
    load(shell, tiny_model)
    old = old_model_ref(shell)
    before = dict(shell.user_ns)
    shell.user_ns["_test_path"] = tiny_model
    before["_test_path"] = tiny_model
    with capture_output() as captured:
        if body:
            shell.run_cell(f"%%llmload {line}\n{body}")
        else:
            shell.run_cell(f"%llmload {line}")
    output = captured.stdout + captured.stderr
    assert message in output
    assert "Traceback" not in output
    assert old() is shell.user_ns["model"]
    assert {k: v for k, v in shell.user_ns.items() if not k.startswith("_")} == {
        k: v for k, v in before.items() if not k.startswith("_")
    }


def test_body_that_raises_reports_release_then_raises(shell, tiny_model):
    load(shell, tiny_model)
    old = old_model_ref(shell)
    # (A nonexistent path is refused before any release now: tests/commands/test_load_cannot_start.py.)
    result, captured = load(shell, tiny_model, "scale = 1 / 0\nmodel = AutoModelForCausalLM.from_pretrained(MODEL_NAME)")
    assert not result.success
    gc.collect()
    assert old() is None  # released before the body ran
    assert "freed" in captured.stdout
    assert captured.stdout.index("Released") < captured.stdout.index("Traceback")
    assert "llmload.py" not in captured.stdout  # the traceback starts at the user's code


def test_trailing_expression_is_returned(shell, tiny_model):
    result, _ = load(shell, tiny_model, LOAD + "model.config.model_type")
    assert result.result == "llama"


def test_hostile_objects_do_not_break_the_scan(shell, tiny_model):
    run(
        shell,
        "class Liar:\n"
        "    def __getattr__(self, name): raise RuntimeError('nope')\n"
        "    def __eq__(self, other): raise RuntimeError('eq')\n"
        "    def __hash__(self): raise RuntimeError('hash')\n"
        "    def __len__(self): raise RuntimeError('len')\n"
        "    def __bool__(self): raise RuntimeError('bool')\n"
        "    @property\n"
        "    def __class__(self): raise RuntimeError('class')\n"
        "liar = Liar()\n"
        "import weakref\n"
        "class Holder: pass\n"
        "h = Holder()\n"
        "proxy = weakref.proxy(h)\n"
        "cycle = []\n"
        "cycle.append(cycle)\n",
    )
    load(shell, tiny_model)
    old = old_model_ref(shell)
    result, captured = load(shell, tiny_model, options="-o")
    assert result.success, captured.stdout
    gc.collect()
    assert old() is None


def test_report_is_plain_data(shell, tiny_model):
    import json

    load(shell, tiny_model)
    result, _ = load(shell, tiny_model, options="-o")
    report = result.result
    data = report.to_dict()
    json.dumps(data)
    assert data["released"]["released"][0]["label"] == "model"
    assert data["models"][0]["rows"][0]["device"] == "cpu"
    torch = sys.modules["torch"]
    assert not any(isinstance(obj, (torch.nn.Module, torch.Tensor)) for obj in _walk(report))


def _walk(obj, seen=None):
    """Every object reachable from a report (dataclasses, tuples, dicts)."""
    seen = seen if seen is not None else {}
    if id(obj) in seen:
        return list(seen.values())
    seen[id(obj)] = obj
    for child in gc.get_referents(obj):
        if isinstance(child, (type, type(sys))):
            continue
        _walk(child, seen)
    return list(seen.values())


def test_unload_removes_everything_and_reload_works(shell):
    from llm_magic.ipython.magics import LLMMagic

    assert "llmload" in shell.magics_manager.magics["cell"]
    shell.run_line_magic("unload_ext", "llm_magic")
    for kind in ("line", "cell"):
        assert not any(name.startswith("llm") for name in shell.magics_manager.magics[kind])
    assert not any(isinstance(c, LLMMagic) for c in shell.configurables)
    shell.run_line_magic("load_ext", "llm_magic")
    assert "llmload" in shell.magics_manager.magics["cell"]
    assert sum(isinstance(c, LLMMagic) for c in shell.configurables) == 1


def test_load_ext_imports_no_torch_or_transformers():
    import subprocess

    code = (
        "import sys\n"
        "from IPython.core.interactiveshell import InteractiveShell\n"
        "InteractiveShell.instance().run_line_magic('load_ext', 'llm_magic')\n"
        "print(sorted(m for m in ('torch', 'transformers', 'accelerate', 'rich') if m in sys.modules))\n"
    )
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert output.strip() == "[]"
