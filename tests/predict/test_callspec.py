"""Reading `from_pretrained` calls out of a cell without running it."""

from __future__ import annotations

import json

import pytest

from llm_magic.predict.calls import find_load_calls, load_call


def one(source, namespace=None):
    calls = find_load_calls(source, namespace or {})
    assert len(calls) == 1, calls
    return calls[0]


def test_literal_arguments():
    call = one(
        'model = AutoModelForCausalLM.from_pretrained("org/m", device_map="auto", '
        'max_memory={0: "20GiB", "cpu": "64GiB"}, offload_folder="off", trust_remote_code=True)'
    )
    assert call.class_name == "AutoModelForCausalLM" and call.kind == "model" and call.class_resolved
    assert call.target == "model"
    assert call.model_id.value == "org/m" and call.model_id.origin == "literal"
    assert call.device_map.value == "auto"
    assert call.max_memory.value == {0: "20GiB", "cpu": "64GiB"}
    assert call.offload_folder.value == "off"
    assert call.trust_remote_code.value is True
    assert not call.quantization_config.present and call.quantization_config.known
    assert call.unknown_arguments() == {}


def test_names_from_the_namespace():
    call = one(
        "model = AutoModelForCausalLM.from_pretrained(MODEL_NAME, device_map=DM, max_memory={'cpu': MEM})",
        {"MODEL_NAME": "org/name", "DM": "auto", "MEM": 123},
    )
    assert call.model_id.value == "org/name" and call.model_id.origin == "namespace"
    assert call.device_map.value == "auto"
    assert call.max_memory.value == {"cpu": 123} and call.max_memory.origin == "namespace"


def test_keyword_model_id_and_arithmetic():
    call = one(
        "m = AutoModel.from_pretrained(pretrained_model_name_or_path=P, max_memory={0: 20 * 1024**3})",
        {"P": "/ckpt"},
    )
    assert call.model_id.value == "/ckpt"
    assert call.max_memory.value == {0: 20 * 1024**3}


def test_torch_dtype_attribute_with_and_without_torch_bound():
    import torch

    bound = one("m = AutoModel.from_pretrained('x', dtype=torch.bfloat16)", {"torch": torch})
    assert bound.dtype.value is torch.bfloat16 and bound.dtype_keyword == "dtype"
    unbound = one("m = AutoModel.from_pretrained('x', torch_dtype=torch.float16)")
    assert unbound.dtype.value is torch.float16 and unbound.dtype_keyword == "torch_dtype"


def test_dtype_wins_over_torch_dtype():
    call = one("m = AutoModel.from_pretrained('x', torch_dtype='float16', dtype='auto')")
    assert call.dtype.value == "auto" and call.dtype_keyword == "dtype"
    legacy = one("m = AutoModel.from_pretrained('x', torch_dtype='auto')")
    assert legacy.dtype.value == "auto" and legacy.dtype_keyword == "torch_dtype"
    absent = one("m = AutoModel.from_pretrained('x')")
    assert not absent.dtype.present and absent.dtype_keyword is None


def test_unknown_expressions_are_not_evaluated():
    ran = []

    def pick():
        ran.append(True)
        return "auto"

    call = one(
        "model = AutoModel.from_pretrained(name(), device_map=pick(), max_memory=undefined, "
        "offload_folder=f'{d}/off', dtype=cfg['dtype'])",
        {"pick": pick, "name": pick, "cfg": {"dtype": "bfloat16"}, "d": "/tmp"},
    )
    assert not ran
    for arg, text in [
        (call.model_id, "name()"),
        (call.device_map, "pick()"),
        (call.max_memory, "undefined"),
        (call.offload_folder, "f'{d}/off'"),
        (call.dtype, "cfg['dtype']"),
    ]:
        assert arg.present and not arg.known and arg.source == text and arg.value is None
    assert set(call.unknown_arguments()) == {"model_id", "device_map", "max_memory", "offload_folder", "dtype"}


def test_attributes_of_non_modules_do_not_run_properties():
    class Settings:
        @property
        def device_map(self):
            raise AssertionError("a property ran")

    call = one("m = AutoModel.from_pretrained('x', device_map=settings.device_map)", {"settings": Settings()})
    assert not call.device_map.known


def test_tuple_and_attribute_targets_and_chained_methods():
    call = one("model, info = AutoModel.from_pretrained('x', output_loading_info=True)")
    assert call.target == "model, info"
    assert "output_loading_info" not in call.config_overrides
    chained = one("self.model = AutoModel.from_pretrained('x').to('cuda').eval()")
    assert chained.target == "self.model" and chained.chained == ("to", "eval")
    bare = one("print(AutoModel.from_pretrained('x'))")
    assert bare.target is None


def test_tokenizer_and_model_in_source_order():
    source = (
        "tok = AutoTokenizer.from_pretrained(MODEL_NAME)\n"
        "model = AutoModelForCausalLM.from_pretrained(MODEL_NAME, device_map='auto')\n"
        "proc = AutoProcessor.from_pretrained(MODEL_NAME)\n"
    )
    calls = find_load_calls(source, {"MODEL_NAME": "m"})
    assert [(c.target, c.kind) for c in calls] == [("tok", "tokenizer"), ("model", "model"), ("proc", "processor")]
    assert [c.lineno for c in calls] == [1, 2, 3]
    assert all(c.model_id.value == "m" for c in calls)


def test_no_call():
    assert find_load_calls("x = 1\nprint(x)\n", {}) == []
    assert find_load_calls("", {}) == []


def test_class_resolution():
    import transformers

    aliased = one("m = LM.from_pretrained('x')", {"LM": transformers.LlamaForCausalLM})
    assert aliased.cls is transformers.LlamaForCausalLM and aliased.kind == "model"
    dotted = one("m = transformers.AutoModel.from_pretrained('x')")
    assert dotted.cls is transformers.AutoModel and dotted.class_expr == "transformers.AutoModel"
    unknown = one("m = MyLoader.from_pretrained('x')")
    assert not unknown.class_resolved and unknown.cls is None
    assert any("guessed" in note for note in unknown.notes)
    by_name = one("t = CustomTokenizer.from_pretrained('x')")
    assert by_name.kind == "tokenizer" and not by_name.class_resolved


def test_double_star_kwargs():
    known = one("m = AutoModel.from_pretrained('x', **KW)", {"KW": {"device_map": "auto", "num_hidden_layers": 2}})
    assert known.device_map.value == "auto" and known.device_map.origin == "kwargs"
    assert known.config_overrides["num_hidden_layers"].value == 2
    hidden = one("m = AutoModel.from_pretrained('x', device_map='auto', **make())")
    assert hidden.device_map.known and hidden.device_map.value == "auto"
    # Not written out, so it could be inside `**make()`: unknown rather than absent.
    assert not hidden.max_memory.known and hidden.max_memory.source == "**make()"


def test_config_overrides_and_location():
    call = one("m = AutoModel.from_pretrained('x', revision='v1', num_hidden_layers=N, attn_implementation='sdpa')",
               {"N": 3})
    assert call.location["revision"].value == "v1"
    assert call.config_overrides["num_hidden_layers"].value == 3
    assert "attn_implementation" not in call.config_overrides


def test_ipython_syntax_lines_are_skipped():
    call = one("%time x = 1\n!ls\nmodel = AutoModel.from_pretrained('x')\n")
    assert call.lineno == 3 and call.model_id.value == "x"


def test_invalid_python_raises_syntax_error():
    with pytest.raises(SyntaxError):
        find_load_calls("model = AutoModel.from_pretrained(", {})


def test_to_dict_is_json_and_load_call_helper():
    import torch

    call = load_call("/ckpt", device_map="auto", dtype=torch.bfloat16, max_memory={"cpu": 10})
    assert call.model_id.value == "/ckpt" and call.dtype.value is torch.bfloat16
    data = json.loads(json.dumps(call.to_dict()))
    assert data["dtype"]["value"] == "torch.bfloat16"
    assert data["max_memory"]["value"] == {"cpu": 10}
    assert data["kind"] == "model"
