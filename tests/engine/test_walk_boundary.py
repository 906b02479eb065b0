"""The walk stays in the user's world: never through loggers, streams or the shell into the
whole notebook namespace.

In a kernel, transformers' logging handler writes to ipykernel's output stream, which leads to
the session, the shell and `user_ns`: a walk from a `Trainer` (or anything holding a logger)
that went on would count every live model as "held" by it. Here the stream is a small stand-in
holding the shell (as the kernel's does, a few links further); one test runs a real kernel.
"""

from __future__ import annotations

import gc
import json
import logging
import weakref

import pytest
from cells import ok, run

TRAINER_CELL = '''
import torch
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

class TinyTexts(torch.utils.data.Dataset):
    """Eight sequences, made on the fly: the dataset holds no tensor of its own."""
    def __len__(self):
        return 8
    def __getitem__(self, index):
        ids = (torch.arange(8) + index) % 200
        return {"input_ids": ids, "labels": ids}

model = AutoModelForCausalLM.from_pretrained(_test_path)
other = AutoModelForCausalLM.from_pretrained(_test_path)  # an unrelated model next to it
args = TrainingArguments(
    output_dir=_test_out, max_steps=1, report_to=[], per_device_train_batch_size=2, optim="sgd",
    save_strategy="no", logging_strategy="no", disable_tqdm=True, use_cpu=True,
)
trainer = Trainer(model=model, args=args, train_dataset=TinyTexts())
trainer.train()
'''


class ShellStream:
    """What ipykernel's stderr is to a logging handler: a stream that reaches the shell."""

    def __init__(self, shell):
        self.shell = shell

    def write(self, text):
        return len(text)

    def flush(self):
        pass


@pytest.fixture
def kernel_like_logging(shell):
    """transformers' logger writes to a stream that leads to the shell, as in a kernel."""
    handler = logging.StreamHandler(ShellStream(shell))
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


def storage_bytes(tensors) -> int:
    storages = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def trainer_tensors(trainer) -> list:
    """The tensors a trainer holds itself (its loss scalar), besides the model's and the optimizer's."""
    import torch

    return [value for value in vars(trainer).values() if isinstance(value, torch.Tensor)]


def test_trainer_holds_the_model_and_nothing_else(shell, tiny_model, tmp_path, kernel_like_logging):
    shell.user_ns.update(_test_path=tiny_model, _test_out=str(tmp_path))
    ok(shell, TRAINER_CELL)
    trainer, model, other = (shell.user_ns[name] for name in ("trainer", "model", "other"))
    old, other_ref = weakref.ref(model), weakref.ref(other)
    model_bytes = storage_bytes(list(model.parameters()) + list(model.buffers()))
    own_bytes = storage_bytes(trainer_tensors(trainer))
    # the optimizer (SGD, no momentum) holds the parameters and no state of its own
    assert not any(trainer.optimizer.state.values())
    del trainer, model, other

    result, captured = run(shell, "%%llmload $_test_path -o\nmodel = AutoModelForCausalLM.from_pretrained(MODEL_NAME)")
    assert result.success, captured.stdout + captured.stderr
    [item] = result.result.released.released
    gc.collect()
    assert not item.freed and old() is not None  # the verdict is true: the trainer keeps it
    assert "trainer.model" in item.held_by
    assert any(path.startswith("trainer.optimizer") for path in item.held_by), item.held_by
    assert not any("other" in path or "shell" in path for path in item.held_by), item.held_by
    assert "NOT freed" in captured.stdout and "trainer.model" in captured.stdout
    assert item.bytes_by_device == {"cpu": model_bytes}

    freed = ok(shell, "%llmfree trainer -o")
    gc.collect()
    [item] = freed.released
    assert item.freed == (old() is None) and item.freed  # freed exactly when weakrefs prove it
    assert freed.freed_bytes == {"cpu": model_bytes + own_bytes}  # the old model's bytes, not `other`'s
    assert other_ref() is shell.user_ns["other"]


def test_object_holding_a_logger_next_to_a_model(shell, tiny_model, kernel_like_logging):
    shell.user_ns["_test_path"] = tiny_model
    ok(
        shell,
        "import logging, torch, weakref\n"
        "from transformers import AutoModelForCausalLM\n"
        "from transformers.utils import logging as hf_logging\n"
        "model = AutoModelForCausalLM.from_pretrained(_test_path)\n"
        "class Box:\n"
        "    pass\n"
        "box = Box()\n"
        "box.logger = hf_logging.get_logger('transformers.my_experiment')\n"
        "box.handlers = list(logging.getLogger('transformers').handlers)\n"
        "box.weights = torch.zeros(1000)\n"
        "probe = weakref.ref(box)\n",
    )
    handler = kernel_like_logging
    assert handler in shell.user_ns["box"].handlers  # box -> handler -> stream -> shell -> model
    model_ref = weakref.ref(shell.user_ns["model"])

    state = ok(shell, "%gpustate --all -o")
    rows = {row.path: row for row in state.holders.rows}
    assert rows["box"].bytes_by_device == {"cpu": 4000}
    assert not rows["model"].shared_with

    report = ok(shell, "%%llmload name -o\nlinear = torch.nn.Linear(2, 2)")
    assert [row.path for row in report.kept] == ["model"]

    dry = ok(shell, "%llmfree box --dry-run -o")
    assert dry.released[0].bytes_by_device == {"cpu": 4000}
    freed = ok(shell, "%llmfree box -o")
    gc.collect()
    assert freed.released[0].freed and shell.user_ns["probe"]() is None
    assert freed.freed_bytes == {"cpu": 4000}
    assert model_ref() is shell.user_ns["model"]


def test_namespaces_and_shell_are_never_walked(shell):
    """`g = globals()`, `ip = get_ipython()`, a function's `__globals__`: the namespace itself,
    not a holder of everything in it."""
    ok(
        shell,
        "import torch\n"
        "model = torch.nn.Linear(300, 300)\n"
        "g = globals()\n"
        "ip = get_ipython()\n"
        "hist = ip.history_manager\n"
        "def uses_model():\n"
        "    return model\n",
    )
    state = ok(shell, "%gpustate --all -o")
    assert [row.path for row in state.holders.rows] == ["model"]
    for name in ("g", "ip", "hist", "uses_model"):
        result = ok(shell, f"%llmfree {name} --dry-run -o")
        assert result.released[0].bytes_by_device == {}, name


@pytest.mark.notebook
def test_trainer_in_a_real_kernel(tiny_model, tmp_path):
    """The case as users meet it: ipykernel's own stream behind transformers' logger."""
    import nbformat
    from support.demo import execute_notebook

    check = (
        "import json, gc, weakref\n"
        "old = weakref.ref(trainer.model)\n"
        "model_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])\n"
        "own = sum(v.numel() * v.element_size() for v in vars(trainer).values() if isinstance(v, torch.Tensor))\n"
        "del model\n"
        "report = %llmload $_test_path -o --no-tokenizer --model-var unrelated\n"
        "freed = %llmfree trainer -o\n"
        "gc.collect()\n"
        "print(json.dumps({'kept': [h.path for h in report.kept], 'freed': freed.released[0].freed,\n"
        "                  'alive': old() is not None, 'freed_bytes': freed.freed_bytes,\n"
        "                  'expected': model_bytes + own, 'held_by': freed.released[0].held_by}))\n"
    )
    setup = f"_test_path = {tiny_model!r}\n_test_out = {str(tmp_path)!r}\n%load_ext llm_magic\n"
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(setup + TRAINER_CELL), nbformat.v4.new_code_cell(check)])
    path = tmp_path / "trainer.ipynb"
    nbformat.write(nb, str(path))
    done = execute_notebook(path, tiny_model)
    text = "".join(out.get("text", "") for out in done.cells[-1].outputs if out.output_type == "stream")
    facts = json.loads(text.strip().splitlines()[-1])
    assert "trainer.model" in facts["kept"]
    assert facts["freed"] and not facts["alive"], facts
    assert facts["freed_bytes"] == {"cpu": facts["expected"]}
