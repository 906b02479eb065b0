"""What the `%%llmload` report says is true: predictions for every load, shared weights once."""

from __future__ import annotations

from cells import ok


def test_loads_inside_tuple_unpacking_get_their_prediction(shell, tiny_model):
    shell.user_ns["_test_path"] = tiny_model
    body = (
        "from transformers import AutoModelForCausalLM\n"
        "draft, model = (AutoModelForCausalLM.from_pretrained(MODEL_NAME), AutoModelForCausalLM.from_pretrained(MODEL_NAME))\n"
    )
    report = ok(shell, f"%%llmload $_test_path -o\n{body}")
    assert [item.target for item in report.predictions] == ["draft", "model"]
    assert all(item.prediction.status == "ok" for item in report.predictions)
    measured = {placement.name: placement.total_bytes for placement in report.models}
    predicted = {item.target: sum(item.prediction.bytes_by_device.values()) for item in report.predictions}
    assert predicted == measured


def test_a_peft_model_and_its_base_share_weights_once(shell, tiny_model):
    shell.user_ns["_test_path"] = tiny_model
    body = (
        "from transformers import AutoModelForCausalLM\n"
        "from peft import LoraConfig, get_peft_model\n"
        "base = AutoModelForCausalLM.from_pretrained(MODEL_NAME)\n"
        "model = get_peft_model(base, LoraConfig(r=2, target_modules=['q_proj']))\n"
    )
    report = ok(shell, f"%%llmload $_test_path -o\n{body}")
    names = [placement.name for placement in report.models]
    assert names == ["base", "model"]
    (shared,) = report.shared
    base_bytes = next(p for p in report.models if p.name == "base").total_bytes
    assert (shared.name, shared.shared_with) == ("model", "base")
    assert sum(shared.bytes_by_device.values()) == base_bytes  # every base weight, counted once
    text = report._repr_mimebundle_()["text/plain"]
    assert "model shares" in text and "with base: the same weights, counted once in memory" in text
