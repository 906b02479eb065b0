"""Per-device placement of real tiny models, loaded by the installed transformers/accelerate."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from llm_magic.measure.placement import DiskSource, find_model, model_placement

# Fits the embedding and the first decoder layer of the default tiny llama (~700 KB in float32)
# on "cpu"; the rest goes to disk. Not the whole model to disk: 4.57.1+ crashes on {"": "disk"}.
CPU_BUDGET = 400_000


def nbytes(tensor) -> int:
    return tensor.numel() * tensor.element_size()


def split_load(path, **options):
    """The model loaded with device_map="auto" and too little RAM: part cpu, part disk."""
    return AutoModelForCausalLM.from_pretrained(path, device_map="auto", max_memory={"cpu": CPU_BUDGET}, **options)


def checkpoint_tensors(path) -> dict[str, torch.Tensor]:
    """The tensors stored in a tiny checkpoint directory (safetensors or .bin)."""
    if os.path.exists(os.path.join(path, "model.safetensors")):
        return load_file(os.path.join(path, "model.safetensors"))
    return torch.load(os.path.join(path, "pytorch_model.bin"), weights_only=True)


def bin_with_tied_weight_once(path, target) -> str:
    """A copy of a safetensors checkpoint as pytorch_model.bin, a tied weight stored under one name.

    `build_tiny_model(safe_serialization=False)` writes what 4.x writes: the tied weight under
    both names. transformers 5.23 unties such a pair when both map to disk (each copy re-saved to
    the offload folder), so the one-name case needs this file.
    """
    shutil.copytree(path, target)
    safetensors_file = os.path.join(target, "model.safetensors")
    torch.save(load_file(safetensors_file), os.path.join(target, "pytorch_model.bin"))
    os.remove(safetensors_file)
    return str(target)


def mapped_device(device_map: dict, name: str) -> str:
    """The row hf_device_map sends `name` to (GPU ordinals become "cuda:N")."""
    prefix = max((p for p in device_map if p == "" or name == p or name.startswith(p + ".")), key=len)
    device = device_map[prefix]
    return f"cuda:{device}" if type(device) is int else str(device)


def expected_rows(model, checkpoint: dict[str, torch.Tensor]) -> dict[str, tuple[int, int]]:
    """device -> (bytes, modules), from the checkpoint and hf_device_map, not from the model's tensors.

    Buffers that are not saved (rotary `inv_freq`) are never offloaded: they stay real on the
    execution device, even inside a module mapped to disk; a module owning only those is there.
    """
    device_bytes: dict[str, int] = {}
    for name, tensor in checkpoint.items():
        device = mapped_device(model.hf_device_map, name)
        device_bytes[device] = device_bytes.get(device, 0) + nbytes(tensor)
    for name, buffer in model.named_buffers():
        if name not in checkpoint:
            device_bytes[str(buffer.device)] = device_bytes.get(str(buffer.device), 0) + nbytes(buffer)

    device_modules: dict[str, int] = {}
    for name, module in model.named_modules():
        own = [f"{name}.{t}" if name else t for t in [*module._parameters, *module._buffers]]
        if not own:
            continue
        if any(t in checkpoint for t in own):
            device = mapped_device(model.hf_device_map, name)
        else:
            device = str(next(iter(module._buffers.values())).device)
        device_modules[device] = device_modules.get(device, 0) + 1
    return {device: (device_bytes.get(device, 0), device_modules.get(device, 0)) for device in device_bytes}


def rows_of(placement) -> dict[str, tuple[int, int]]:
    return {row.device: (row.nbytes, row.modules) for row in placement.rows}


def test_plain_cpu_load(tiny_models):
    model = AutoModelForCausalLM.from_pretrained(tiny_models(dtype="bfloat16"), dtype=torch.bfloat16)
    placement = model_placement(model, "model")

    expected = sum(map(nbytes, model.parameters())) + sum(map(nbytes, model.buffers()))
    # Modules that own a tensor directly: embed, norm, lm_head, rotary_emb, and per layer
    # 4 attention projections + 3 MLP projections + 2 norms.
    assert rows_of(placement) == {"cpu": (expected, 4 + 4 * 9)}
    assert placement.total_bytes == expected and placement.rows[0].share == 1.0
    assert set(placement.dtypes) <= {"bfloat16", "float32"}  # rotary buffers may stay float32
    assert placement.dtypes["bfloat16"] == sum(p.numel() * 2 for p in model.parameters())
    assert placement.class_name == "LlamaForCausalLM"
    assert placement.offloaded_devices() == ()
    assert placement.slow_tier_warning(accelerator_present=False) is None
    # A model wholly on cpu next to an accelerator is the silent offload.
    warning = placement.slow_tier_warning(accelerator_present=True)
    assert warning is not None and "40 modules" in warning and "100%" in warning


def test_tied_weights_count_once(tiny_models):
    untied = model_placement(AutoModelForCausalLM.from_pretrained(tiny_models()), "untied")
    tied_model = AutoModelForCausalLM.from_pretrained(tiny_models(tie_word_embeddings=True))
    assert tied_model.lm_head.weight is tied_model.model.embed_tokens.weight
    tied = model_placement(tied_model, "tied")

    assert untied.total_bytes - tied.total_bytes == nbytes(tied_model.model.embed_tokens.weight)
    # lm_head still owns its (shared) weight: it counts as a module.
    assert tied.rows[0].modules == untied.rows[0].modules


def test_auto_split_to_cpu_and_disk(tiny_model):
    model = split_load(tiny_model)
    placement = model_placement(model, "model")
    checkpoint = checkpoint_tensors(tiny_model)

    assert set(model.hf_device_map.values()) == {"cpu", "disk"}
    assert rows_of(placement) == expected_rows(model, checkpoint)
    unsaved = sum(nbytes(b) for n, b in model.named_buffers() if n not in checkpoint)
    assert placement.total_bytes == sum(map(nbytes, checkpoint.values())) + unsaved
    assert placement.hf_device_map == model.hf_device_map
    safetensors_file = os.path.join(tiny_model, "model.safetensors")
    assert placement.disk_sources == (DiskSource(safetensors_file, "safetensors", os.path.getsize(safetensors_file)),)
    assert placement.offloaded_devices() == ("disk",)
    assert placement.offloaded_devices(accelerator_present=True) == ("cpu", "disk")
    warning = placement.slow_tier_warning(accelerator_present=False)
    assert "on disk" in warning and "very slow" in warning and "on cpu" not in warning


def test_bin_checkpoint_offloaded_to_folder(tiny_models, tmp_path):
    path = tiny_models(safe_serialization=False)
    folder = tmp_path / "offload"
    model = split_load(path, offload_folder=str(folder))
    placement = model_placement(model, "model")

    assert rows_of(placement) == expected_rows(model, checkpoint_tensors(path))
    # 4.x writes accelerate's `.dat` memmaps + index.json, 5.x one safetensors file per weight.
    folder_size = sum(entry.stat().st_size for entry in os.scandir(folder) if entry.is_file())
    assert placement.disk_sources == (DiskSource(str(folder), "offload_folder", folder_size),)
    assert folder_size >= placement.row("disk").nbytes


def test_table_without_hf_device_map(tiny_model):
    model = split_load(tiny_model)
    with_map = model_placement(model, "model")
    del model.hf_device_map
    without_map = model_placement(model, "model")

    assert without_map.hf_device_map is None
    assert without_map.rows == with_map.rows
    assert without_map.disk_sources == with_map.disk_sources


def test_tied_weights_on_disk_recorded_under_one_name(tiny_models, tmp_path):
    """4.57 (and 5.x for re-saved weights) index a tied weight under its first name only."""
    path = bin_with_tied_weight_once(tiny_models(tie_word_embeddings=True), tmp_path / "bin")
    device_map = {"model.embed_tokens": "disk", "lm_head": "disk", "model.layers": "cpu", "model.norm": "cpu"}
    device_map["model.rotary_emb"] = "cpu"
    model = AutoModelForCausalLM.from_pretrained(path, device_map=device_map, offload_folder=str(tmp_path / "off"))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.device.type == "meta"

    placement = model_placement(model, "model")
    assert [row.device for row in placement.rows] == ["cpu", "disk"]  # no "meta": both names resolved
    # embed_tokens and lm_head, one weight between them.
    assert (placement.row("disk").nbytes, placement.row("disk").modules) == (nbytes(model.lm_head.weight), 2)


def test_cpu_offloaded_weights_in_a_state_dict_through_a_sequential_hook(tiny_models):
    """accelerate's cpu_offload: every weight is meta, the data lives in a plain state dict.

    This is the layout of cpu-mapped modules on a GPU machine (weights in RAM, moved to the
    accelerator per forward). A hook already on lm_head makes accelerate chain both in a
    SequentialHook.
    """
    from accelerate import cpu_offload
    from accelerate.hooks import ModelHook, SequentialHook, add_hook_to_module

    model = AutoModelForCausalLM.from_pretrained(tiny_models(tie_word_embeddings=True))
    before = model_placement(model, "model")
    add_hook_to_module(model.lm_head, ModelHook())
    cpu_offload(model, execution_device="cpu")
    assert type(model.lm_head._hf_hook) is SequentialHook
    assert model.lm_head.weight.device.type == "meta"

    assert rows_of(model_placement(model, "model")) == rows_of(before)


def test_meta_without_offload_record_is_unknown(tiny_models):
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_models()))
    placement = model_placement(model, "empty")

    assert [row.device for row in placement.rows] == ["meta"]
    assert placement.total_bytes == sum(map(nbytes, model.parameters())) + sum(map(nbytes, model.buffers()))


def test_find_model():
    module = torch.nn.Linear(2, 2)

    class Pipeline:
        def __init__(self, model):
            self.model = model

        def __getattr__(self, name):
            raise RuntimeError("user code must not run")

    class Liar:
        """Claims to be a module; is not."""

        @property
        def __class__(self):
            return torch.nn.Module

    assert find_model(module) is module
    assert find_model(Pipeline(module)) is module
    assert find_model(Pipeline("not a model")) is None
    assert isinstance(Liar(), torch.nn.Module)
    assert find_model(Liar()) is None
    assert find_model(42) is None


def test_model_placement_refuses_a_non_module():
    with pytest.raises(TypeError):
        model_placement(object(), "x")


def test_to_dict_is_json(tiny_model):
    data = json.loads(json.dumps(model_placement(split_load(tiny_model), "model").to_dict()))
    assert [row["device"] for row in data["rows"]] == ["cpu", "disk"]
    assert data["disk_sources"][0]["kind"] == "safetensors"


@pytest.mark.gpu
def test_gpu_cpu_disk_split(tiny_model):
    """On a GPU, cpu-mapped modules are offloaded too: meta weights backed by a state dict in RAM."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model, device_map="auto", max_memory={0: 300_000, "cpu": 250_000})
    placement = model_placement(model, "model")

    assert rows_of(placement) == expected_rows(model, checkpoint_tensors(tiny_model))
    assert placement.rows[0].device == "cuda:0"
    mapped = {mapped_device(model.hf_device_map, name) for name in model.hf_device_map}
    assert placement.offloaded_devices() == tuple(d for d in ("cpu", "disk") if d in mapped)
    if "cpu" in mapped:
        assert any(p.device.type == "meta" for p in model.parameters())
        warning = placement.slow_tier_warning(accelerator_present=True)
        assert warning is not None and "on cpu" in warning
