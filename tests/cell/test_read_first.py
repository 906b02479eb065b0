"""Never lose the user's work: a target the cell reads before rebinding it is not released.

`model = get_peft_model(model, cfg)` inside `%%llmload` used to release `model` first, then fail
with NameError: the model was gone. Each body here reads the model it rebinds; the cell must
work, the old model must be kept (weak reference alive until the cell replaced it), and the
report must say so.
"""

from __future__ import annotations

import ast
import gc
import weakref

import pytest
from cells import LOAD, changed_names, namespace_ids, ok, run
from cells import llmload as load

from llm_magic.cell.magics import UnreadableMagic, expand_line_magics
from llm_magic.cell.reads import analyse_reads
from llm_magic.engine.paths import parse_target

# -- the analysis itself: statement order, branches, loops, scopes ---------------------------

READS = [
    ("model = model.to(torch.bfloat16)", "model", True),
    ("model = AutoModel.from_pretrained(MODEL_NAME)\nmodel.eval()", "model", False),
    ("model = get_peft_model(model, cfg)", "model", True),
    ("model = torch.compile(model)", "model", True),
    ("tok = T.from_pretrained(M)\nmodel = A.from_pretrained(M)\nmodel", "model", False),
    ('models["a"] = load()\nmodels["a"].eval()\nmodels', 'models["a"]', False),
    ('models["a"] = load(models["b"])', 'models["a"]', False),
    ('models["a"] = load(models["b"])', 'models["b"]', True),
    ('models["a"] = load(models)', 'models["a"]', True),
    ("box.model = load()\nbox.model.eval()", "box.model", False),
    ("if c:\n    model = a()\nelse:\n    model = b()\nmodel.eval()", "model", False),
    ("if c:\n    model = a()\nmodel.eval()", "model", True),
    ("for x in y:\n    model = a(model)\n", "model", True),
    ("while c:\n    model = a()\nmodel.eval()", "model", True),
    ("del model\nmodel = a()", "model", True),
    ("model += 1", "model", True),
    ("def f():\n    return model\nmodel = f()", "model", True),
    ("def f(model):\n    return model\nmodel = f(1)", "model", False),
    ("g = lambda: model\nmodel = a()", "model", True),
    ("model = [m for m in model]", "model", True),
    ("model = [model for model in xs]", "model", False),
    ("with torch.device('meta'):\n    model = A(cfg)\nmodel.to_empty()", "model", False),
    ("try:\n    model = a()\nexcept E:\n    model.x\n", "model", True),
    ("try:\n    model = a()\nexcept E:\n    raise\nmodel.eval()", "model", True),
    ("class C:\n    m = model\nmodel = C.m", "model", True),
    ("import model\n", "model", False),
    ("model = a() if ok(model) else b()", "model", True),
]


@pytest.mark.parametrize("source, target, read_first", READS)
def test_reads_before_binding(source, target, read_first):
    reads = analyse_reads(ast.parse(source))
    assert reads.before_binding(parse_target(target)) is read_first


def _expanded(shell, cell):
    return expand_line_magics(ast.parse(shell.transform_cell(cell)))


@pytest.mark.parametrize(
    "cell, assigns, reads_model",
    [
        ("%time model = load(X)\n", ["model"], False),
        ("%time model = load(model)\n", ["model"], True),
        ("model = %time load()\n", ["model"], False),
        ("%prun -s cumulative -q model = load()\n", ["model"], False),
        ("%memit model = load()\n", ["model"], False),
        ("%timeit -o -n 1 model = load()\n", [], False),  # timeit binds in a scope of its own
        ("%timeit f(model)\nmodel = load()\n", ["model"], True),
        ("%gpustate\nmodel = load()\n", ["model"], False),
    ],
)
def test_line_magics_are_read_as_what_they_run(shell, cell, assigns, reads_model):
    from llm_magic.cell.body import assignment_targets

    tree = _expanded(shell, cell)
    assert [path.text for path in assignment_targets(tree)] == assigns
    assert analyse_reads(tree).before_binding(parse_target("model")) is reads_model


@pytest.mark.parametrize("cell", ["%run setup.py\nmodel = load()\n", "%store -r model\n", "%my_unknown_magic x\n"])
def test_magics_that_may_bind_unseen_names_are_refused(shell, cell):
    with pytest.raises(UnreadableMagic, match="nothing was released"):
        _expanded(shell, cell)


# -- in a real shell, with real models -------------------------------------------------------

TRANSFORMS = {
    "to": "import torch\nmodel = model.to(torch.bfloat16)\n",
    "compile": "import torch\nmodel = torch.compile(model)\n",
    "get_peft_model": (
        "from peft import LoraConfig, get_peft_model\n"
        "model = get_peft_model(model, LoraConfig(r=2, target_modules=['q_proj', 'v_proj']))\n"
    ),
    "prepare_model_for_kbit_training": "from peft import prepare_model_for_kbit_training\nmodel = prepare_model_for_kbit_training(model)\n",
    "PeftModel.from_pretrained": "from peft import PeftModel\nmodel = PeftModel.from_pretrained(model, ADAPTER)\n",
}


@pytest.fixture
def adapter(tmp_path, tiny_model):
    """A real LoRA adapter directory for the tiny model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).save_pretrained(tmp_path / "adapter")
    return str(tmp_path / "adapter")


@pytest.mark.parametrize("kind", sorted(TRANSFORMS))
def test_body_that_transforms_the_model_it_rebinds_keeps_it(shell, tiny_model, adapter, kind):
    load(shell, tiny_model, LOAD)
    shell.user_ns["ADAPTER"] = adapter
    old = weakref.ref(shell.user_ns["model"])
    before = namespace_ids(shell)
    result, captured = load(shell, tiny_model, TRANSFORMS[kind])
    output = captured.stdout + captured.stderr
    assert result.success, output
    report = result.result
    assert report.kept_for_reads == ("model",)
    assert "kept `model`: the cell reads it before rebinding it" in output
    assert [item.label for item in report.released.released] == []
    new = shell.user_ns["model"]
    assert "NameError" not in output
    # The new model is built from the old one: `.to` returns the module itself; the others wrap
    # it or compile it, and it lives on inside.
    if kind == "to":
        assert old() is new
    else:
        assert old() is not None
    assert changed_names(before, namespace_ids(shell)) <= {"model", "MODEL_NAME", "torch", "LoraConfig", "get_peft_model",
                                                           "prepare_model_for_kbit_training", "PeftModel", "AutoModelForCausalLM"}


def test_time_magic_in_the_body_releases_the_old_model_first(shell, tiny_model):
    load(shell, tiny_model, LOAD)
    run(shell, "model")  # Out[n], _ hold it too
    old = weakref.ref(shell.user_ns["model"])
    shell.user_ns["_probe"] = old
    # The hook runs inside from_pretrained: the old model must be gone before the new is built.
    body = (
        "import gc\nfrom transformers import AutoModelForCausalLM\n"
        "gc.collect()\n_seen_alive = _probe() is not None\n"
        "%time model = AutoModelForCausalLM.from_pretrained(MODEL_NAME)\n"
    )
    result, captured = load(shell, tiny_model, body)
    assert result.success, captured.stdout + captured.stderr
    gc.collect()
    assert shell.user_ns["_seen_alive"] is False
    assert old() is None
    assert [item.label for item in result.result.released.released] == ["model"]
    assert result.result.models and result.result.models[0].name == "model"  # not listed as "kept"
    assert all(holder.path != "model" for holder in result.result.kept)


def test_unreadable_magic_in_the_body_changes_nothing(shell, tiny_model):
    load(shell, tiny_model, LOAD)
    old = weakref.ref(shell.user_ns["model"])
    before = namespace_ids(shell)
    result, captured = run(shell, "%%llmload $_test_path\n%run setup.py\nmodel = AutoModelForCausalLM.from_pretrained(MODEL_NAME)\n")
    output = captured.stdout + captured.stderr
    assert "%run" in output and "nothing was released" in output
    assert "Traceback" not in output and len(output.strip().splitlines()) == 1
    assert old() is shell.user_ns["model"]
    assert changed_names(before, namespace_ids(shell)) == set()


def test_release_all_keeps_what_the_body_reads(shell, tiny_model):
    load(shell, tiny_model, LOAD)
    ok(shell, "import torch\nbase = torch.nn.Linear(64, 64)\nbystander = torch.nn.Linear(64, 64)")
    base, bystander = weakref.ref(shell.user_ns["base"]), weakref.ref(shell.user_ns["bystander"])
    body = LOAD + "adapter_source = base\n"
    result, captured = load(shell, tiny_model, body, options="--release-all -o")
    assert result.success, captured.stdout + captured.stderr
    gc.collect()
    assert base() is not None and shell.user_ns["adapter_source"] is base()
    assert bystander() is None
