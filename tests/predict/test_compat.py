"""The compat layer: every private symbol of transformers/accelerate the package reaches, removed in
turn, leaves `%%llmload` working (release proven by weak reference, load, report), with the
prediction "unknown" and saying which symbol is missing."""

from __future__ import annotations

import importlib
import weakref

import pytest
from IPython.utils.capture import capture_output

from llm_magic.compat import (
    CompatError,
    Symbol,
    call_function,
    private_symbols,
    resolve,
)
from llm_magic.compat import transformers as tf
from llm_magic.compat.accelerate import FILE_SIZE

SYMBOLS = private_symbols()

# The body reads `max_memory` as strings (accelerate's size parser) and loads in bfloat16 (4.x
# then sets torch's default dtype while building): every symbol below is on its path.
BODY = (
    "import torch\n"
    "from transformers import AutoModelForCausalLM\n"
    "model = AutoModelForCausalLM.from_pretrained(MODEL_NAME, device_map='auto', dtype=torch.bfloat16, "
    "max_memory={'cpu': '500MB'})\n"
)
V5 = tf.major() >= 5
ON_THE_PATH = {tf.AUTO_BASE, tf.GET_MODEL_CLASS, tf.INIT_CONTEXT, FILE_SIZE,
               *((tf.DEVICE_MAP_V5, tf.DTYPE_PLAN) if V5 else (tf.DEVICE_MAP_V4, tf.SET_DEFAULT_DTYPE))}
# Also called by transformers' own `_get_device_map`, which the prediction calls: removed, that
# helper fails inside transformers, and the prediction says so instead of placing.
INSIDE_HELPERS = {tf.MODULE_SIZES_V5} if V5 else set()


def owner_of(symbol: Symbol):
    """(object holding the name, the name): the module, or the class for `Class.attr`."""
    owner = importlib.import_module(symbol.module)
    *parents, name = symbol.qualname.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    return owner, name


def remove_outside_the_real_load(monkeypatch, symbol: Symbol) -> None:
    """Delete `symbol`, except while the cell's own from_pretrained runs: a future transformers
    without it still loads (its loader has its own replacement); only our private use breaks."""
    import transformers

    owner, name = owner_of(symbol)
    raw = vars(owner)[name]  # the descriptor itself (a classmethod stays a classmethod)
    monkeypatch.delattr(owner, name)
    original = transformers.AutoModelForCausalLM.from_pretrained.__func__

    def loading(cls, *args, **kwargs):
        setattr(owner, name, raw)
        try:
            return original(cls, *args, **kwargs)
        finally:
            delattr(owner, name)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(loading))


def llmload(shell, path, options=""):
    shell.user_ns["_test_path"] = path
    with capture_output() as captured:
        result = shell.run_cell(f"%%llmload $_test_path -o {options}\n{BODY}", store_history=True)
    return result, captured.stdout + captured.stderr


def test_the_list_is_what_the_installed_versions_have():
    assert SYMBOLS and len(set(SYMBOLS)) == len(SYMBOLS)
    for symbol in SYMBOLS:
        resolve(symbol)  # raises CompatError if the list names something this version lacks
    assert ON_THE_PATH <= set(SYMBOLS)


@pytest.mark.parametrize("symbol", SYMBOLS, ids=lambda symbol: symbol.path)
def test_llmload_works_with_each_private_symbol_removed(shell, tiny_model, monkeypatch, symbol):
    import transformers

    first, _ = llmload(shell, tiny_model)
    assert first.success
    old = weakref.ref(shell.user_ns["model"])
    remove_outside_the_real_load(monkeypatch, symbol)
    with pytest.raises(CompatError, match=symbol.qualname.rsplit(".", 1)[-1]):
        resolve(symbol)

    result, output = llmload(shell, tiny_model)
    assert result.success, output
    assert old() is None  # the old model was released
    assert isinstance(shell.user_ns["model"], transformers.PreTrainedModel)
    report = result.result
    assert [placement.class_name for placement in report.models] == ["LlamaForCausalLM"]
    assert "model: LlamaForCausalLM" in output and "Traceback" not in output
    prediction = report.predictions[0].prediction
    missing = symbol.qualname.rsplit(".", 1)[-1]
    if symbol in ON_THE_PATH:
        assert prediction.status == "unknown" or symbol == tf.DTYPE_PLAN  # that one only loses the fp32 rules
        assert any(missing in note for note in prediction.notes), prediction.notes
    elif symbol in INSIDE_HELPERS:
        assert prediction.status == "unknown" and any(missing in error for error in prediction.will_raise)
    else:
        assert prediction.status == "ok", prediction.notes


def test_a_changed_signature_is_a_compat_error_not_a_misbound_call():
    def helper(model, device_map):
        return (model, device_map)

    assert call_function(helper, "helper", model=1, device_map=2) == (1, 2)
    # An optional keyword the function lacks is dropped; a required one is an error.
    assert call_function(helper, "helper", optional=("extra",), model=1, device_map=2, extra=3) == (1, 2)
    with pytest.raises(CompatError, match="helper has another signature"):
        call_function(helper, "helper", model=1, max_memory=2)


def test_version_is_read_without_importing_transformers():
    import subprocess
    import sys

    code = ("import sys; from llm_magic.compat.transformers import version; v = version(); "
            "print(v, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"{tf.version()} False"
    assert tf.version("4.57.6") == (4, 57) and tf.version("5.0.0rc1") == (5, 0)
