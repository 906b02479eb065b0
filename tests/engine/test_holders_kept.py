"""`%%llmload`'s "Still loaded" list: what the user keeps, named, each by its total."""

from __future__ import annotations

import pytest
from cells import LOAD, ok, run

GENERATE = (
    "import torch\n"
    "prompt = torch.randint(4, 200, (16, 190))\n"
    "out = model.generate(prompt, max_new_tokens=10, min_new_tokens=10, do_sample=False,\n"
    "                     return_dict_in_generate=True, pad_token_id=0)\n"
)


def tensors_in(obj, seen=None):
    """The tensors inside a generate output, found by a plain recursive read (not our walk)."""
    import torch

    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        children = list(obj.values())
    elif isinstance(obj, (list, tuple)):
        children = list(obj)
    elif hasattr(obj, "__dict__"):
        children = list(vars(obj).values())
    else:
        children = []
    return [tensor for child in children for tensor in tensors_in(child, seen)]


def test_object_of_many_small_tensors_is_kept_by_its_total(shell, tiny_model):
    shell.user_ns["_test_path"] = tiny_model
    ok(shell, f"%%llmload $_test_path -o\n{LOAD}")
    ok(shell, GENERATE)
    tensors = tensors_in(shell.user_ns["out"])
    sizes = {tensor.untyped_storage().data_ptr(): tensor.untyped_storage().nbytes() for tensor in tensors}
    assert len(sizes) > 8 and max(sizes.values()) < 1 << 20 < sum(sizes.values())  # many, small, > 1 MiB

    report = ok(shell, f"%%llmload $_test_path -o\n{LOAD}")
    kept = {row.path: row for row in report.kept}
    assert kept["out"].bytes_by_device == {"cpu": sum(sizes.values())}
    assert kept["out"].kind == "named" and not kept["out"].is_model


def test_kept_rows_are_the_engines_holder_rows(shell, tiny_model):
    """One holder record: the kept list and `%gpustate` show the same rows for the same object."""
    from llm_magic.engine.holders import HolderRow

    shell.user_ns["_test_path"] = tiny_model
    ok(shell, f"%%llmload $_test_path -o\n{LOAD}\nother = AutoModelForCausalLM.from_pretrained(MODEL_NAME)")
    report = ok(shell, f"%%llmload $_test_path -o\n{LOAD}")
    state = ok(shell, "%gpustate --all -o")
    [kept] = report.kept
    assert isinstance(kept, HolderRow) and kept.path == "other" and kept.is_model
    row = {row.path: row for row in state.holders.rows}["other"]
    assert (kept.type_name, kept.bytes_by_device) == (row.type_name, row.bytes_by_device)
    data = report.to_dict()["kept"][0]
    assert {"path", "type", "bytes_by_device"} <= set(data) and data["path"] == "other"


@pytest.mark.parametrize("shared", [True, False])
def test_kept_leaves_out_storage_of_the_new_model(shell, tiny_model, shared):
    """An optimizer over the newly loaded model holds no memory of its own: not "still loaded"."""
    shell.user_ns["_test_path"] = tiny_model
    body = LOAD + "opt = torch.optim.SGD(model.parameters(), lr=0.1)\n" + ("" if shared else "extra = torch.zeros(400_000)\n")
    report = ok(shell, f"%%llmload $_test_path -o\nimport torch\n{body}")
    assert [row.path for row in report.kept] == ([] if shared else ["extra"])
    result, captured = run(shell, "%gpustate --all")
    assert "opt" in captured.stdout  # %gpustate still shows it, with what it shares


def test_stale_bytes_leave_out_only_what_a_named_holder_keeps_alive():
    """`%gpustate`'s flags and watch mode's warnings count a stale copy the same way: storage it
    shares with a named holder stays alive with that name; shared with another stale copy, it
    is freed with them."""
    from dataclasses import replace

    from llm_magic.engine.holders import HIDDEN, HolderRow

    row = HolderRow("Out[3]", HIDDEN, "LlamaForCausalLM", {"cpu": 100, "cuda:0": 10}, {"cpu": 60}, ("last traceback",))
    assert row.stale_bytes({"model"}) == {"cpu": 100, "cuda:0": 10}
    assert replace(row, shared_with=("model",)).stale_bytes({"model"}) == {"cpu": 40, "cuda:0": 10}
    assert replace(row, shared_with=("model",), shared_by_device={"cpu": 100}).stale_bytes({"model"}) == {"cuda:0": 10}
