"""`%%llmload` pre-flight: --dry-run, --strict, the predicted placement and the headroom."""

from __future__ import annotations

import weakref

import pytest
from IPython.utils.capture import capture_output

SPLIT_LOAD = (
    "from transformers import AutoModelForCausalLM\n"
    "model = AutoModelForCausalLM.from_pretrained(MODEL_NAME, device_map='auto', "
    "max_memory={'cpu': 400_000}, offload_folder=OFFLOAD)\n"
)
PLAIN_LOAD = "from transformers import AutoModelForCausalLM\nmodel = AutoModelForCausalLM.from_pretrained(MODEL_NAME)\n"


@pytest.fixture
def calls(monkeypatch):
    """Every keyword set passed to the real AutoModelForCausalLM.from_pretrained (still called)."""
    import transformers

    seen: list[dict] = []
    original = transformers.AutoModelForCausalLM.from_pretrained.__func__

    def recording(cls, *args, **kwargs):
        seen.append(kwargs)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(recording))
    return seen


def cell(shell, path, body, options="", tmp_path=None):
    shell.user_ns["_test_path"] = path
    if tmp_path is not None:
        shell.user_ns["OFFLOAD"] = str(tmp_path / "offload")
    with capture_output() as captured:
        result = shell.run_cell(f"%%llmload $_test_path {options}\n{body}", store_history=True)
    return result, captured.stdout + captured.stderr


def test_dry_run_prints_prediction_and_loads_nothing(shell, tiny_model, calls, tmp_path):
    cell(shell, tiny_model, PLAIN_LOAD)
    old = weakref.ref(shell.user_ns["model"])
    calls.clear()
    result, output = cell(shell, tiny_model, SPLIT_LOAD, "--dry-run -o", tmp_path)
    report = result.result
    assert calls == []  # nothing loaded
    assert old() is shell.user_ns["model"]  # nothing released
    assert report.dry_run and report.models == ()
    assert "Predicted placement of model" in output and "disk" in output and "would be released" in output
    prediction = report.predictions[0].prediction
    assert set(prediction.bytes_by_device) == {"cpu", "disk"}


def test_prediction_matches_the_real_split(shell, tiny_model, tmp_path):
    result, output = cell(shell, tiny_model, SPLIT_LOAD, "-o", tmp_path)
    report = result.result
    predicted = report.predictions[0].prediction
    [placement] = report.models
    assert predicted.device_map == {k: str(v) for k, v in shell.user_ns["model"].hf_device_map.items()}
    assert {row.device for row in placement.rows} == {"cpu", "disk"}
    assert "predicted" in output  # the column beside the real placement
    assert any("disk" in warning for warning in report.warnings)


def test_strict_refuses_a_disk_load_before_reading_weights(shell, tiny_model, calls, tmp_path):
    cell(shell, tiny_model, PLAIN_LOAD)
    old = weakref.ref(shell.user_ns["model"])
    shell.user_ns["OFFLOAD"] = str(tmp_path / "offload")
    names_before = {name: id(value) for name, value in shell.user_ns.items() if not name.startswith("_")}
    calls.clear()
    result, output = cell(shell, tiny_model, SPLIT_LOAD, "--strict")
    assert not result.success and type(result.error_in_exec).__name__ == "StrictRefusal"
    assert calls == []  # refused before from_pretrained ran
    assert old() is shell.user_ns["model"]
    names_after = {name: id(value) for name, value in shell.user_ns.items() if not name.startswith("_")}
    assert names_after == names_before
    message = str(result.error_in_exec)
    assert "disk" in message and "needs" in message and "nothing was released" in message
    assert "Traceback" not in output


def test_strict_config_trait(shell, tiny_model, calls, tmp_path):
    shell.run_line_magic("config", "LLMMagic.strict = True")
    result, _ = cell(shell, tiny_model, SPLIT_LOAD, "", tmp_path)
    assert type(result.error_in_exec).__name__ == "StrictRefusal" and calls == []
    shell.run_line_magic("config", "LLMMagic.strict = False")
    result, _ = cell(shell, tiny_model, SPLIT_LOAD, "", tmp_path)
    assert result.success and len(calls) == 1


def test_strict_lets_a_load_that_fits_through(shell, tiny_model):
    result, _ = cell(shell, tiny_model, PLAIN_LOAD, "--strict -o")
    assert result.success and result.result.models


def test_headroom_is_in_every_load_report(shell, tiny_model):
    result, output = cell(shell, tiny_model, PLAIN_LOAD, "--batch 4 -o")
    [headroom] = result.result.headroom
    assert headroom.bytes_per_token > 0 and headroom.device == "cpu"
    assert [fit.batch for fit in headroom.fits] == [1, 4]
    line = headroom.generation  # the simulated peak of generate, capped at the 256-token context
    assert line.context_window == 256 and line.whole_context and line.batch == 4
    words = " ".join(output.split())  # the line breaks between clauses at the terminal's width
    assert "Generation headroom of model (float32, sdpa): fits: the full 256-token context at batch 4" in words


def test_empty_body_passes_max_memory_computed_after_release(shell, tiny_model, calls):
    with capture_output():
        shell.run_cell(f"%llmload {tiny_model} --no-tokenizer")
    [kwargs] = calls
    assert kwargs["device_map"] == "auto"
    assert isinstance(kwargs["max_memory"], dict) and kwargs["max_memory"]["cpu"] > 0


def test_bad_batch_is_a_usage_error(shell, tiny_model):
    result, output = cell(shell, tiny_model, PLAIN_LOAD, "--batch 0")
    assert "at least 1" in output


def test_dry_run_of_the_default_loader_names_the_users_variable_and_counts_like_the_report(shell, tiny_model):
    """`%llmload MODEL --dry-run` predicts `model` (not an internal name), and its module
    counts per device are the ones the real report's placement table then shows."""
    with capture_output() as captured:
        dry = shell.run_line_magic("llmload", f"{tiny_model} --no-tokenizer --dry-run -o")
    [predicted] = dry.predictions
    assert predicted.target == "model"
    assert "Predicted placement of model:" in captured.stdout
    with capture_output():
        loaded = shell.run_line_magic("llmload", f"{tiny_model} --no-tokenizer -o")
    [placement] = loaded.models
    assert predicted.prediction.modules_by_device == {row.device: row.modules for row in placement.rows}
    assert loaded.predictions[0].prediction.modules_by_device == predicted.prediction.modules_by_device


def test_dry_run_shows_the_generation_line_of_the_predicted_placement(shell, tiny_model):
    """`%%llmload --dry-run` gives, before any weight is read, the same headroom line the real
    load then reports (same placement, same free memory)."""
    dry, dry_output = cell(shell, tiny_model, PLAIN_LOAD, "--dry-run -o")
    [item] = dry.result.predictions
    planned = item.prediction.generation
    assert planned is not None and planned.context_window == 256
    assert "Generation headroom of model" in " ".join(dry_output.split())
    real, _ = cell(shell, tiny_model, PLAIN_LOAD, "-o")
    [loaded] = real.result.headroom
    assert planned.summary.split(" (")[0] == loaded.generation.summary.split(" (")[0]
    assert planned.max_prompt_tokens == loaded.generation.max_prompt_tokens


def test_dry_run_generation_capacity_is_free_memory_less_the_predicted_weights(shell, tiny_models):
    """Tied weights count once: what generation gets is the free memory less the predicted
    placement's bytes, not less the meta model's parameters (built untied on transformers 5)."""
    path = tiny_models(tie_word_embeddings=True)
    dry, _ = cell(shell, path, PLAIN_LOAD, "--dry-run -o")
    [item] = dry.result.predictions
    free = dry.result.memory_before.device("cpu").free_bytes
    assert item.prediction.generation.capacity_bytes["cpu"] == free - item.prediction.bytes_by_device["cpu"]
    real, _ = cell(shell, path, PLAIN_LOAD, "-o")
    [placement] = real.result.models
    assert item.prediction.bytes_by_device["cpu"] == placement.total_bytes  # the tied weight once


def test_a_failing_generation_line_leaves_the_dry_run_prediction_standing(shell, tiny_model, monkeypatch):
    from llm_magic.predict import gen_headroom

    def broken(*args, **kwargs):
        raise RuntimeError("simulation broke")

    monkeypatch.setattr(gen_headroom, "fit_line_for_meta_model", broken)
    dry, _ = cell(shell, tiny_model, PLAIN_LOAD, "--dry-run -o")
    [item] = dry.result.predictions
    assert item.prediction.status == "ok" and item.prediction.bytes_by_device
    assert item.prediction.generation is None
    assert "generation headroom unknown (RuntimeError: simulation broke)" in item.prediction.notes
