"""Nothing but the reported targets changes: every magic, run over a hostile namespace, changes
only the names it says it released (and IPython's own bookkeeping)."""

from __future__ import annotations

import pytest
from cells import LOAD, ok, run
from support.hostile import (
    HOSTILE,
    PROXIES,
)

pytestmark = pytest.mark.usefixtures("frozen_imports")


# -- nothing but the reported targets changes ------------------------------------------------


def _snapshot(shell):
    return (
        {name: id(value) for name, value in shell.user_ns.items()},
        {key: id(value) for key, value in shell.user_ns["Out"].items()},
    )


def _released_labels(result) -> tuple[set[str], bool]:
    """Every label a LoadReport or ReleaseResult says it dropped, and whether it was a dry run."""
    release = result.released if hasattr(result, "model_name") else result
    labels = set(release.also_cleared)
    for item in release.released:
        labels |= {item.label, *item.cleared}
    return labels, release.dry_run


def _checked(shell, cell, *, body_names=(), report=True):
    """Run a magic cell; assert only its reported targets and IPython's bookkeeping changed."""
    count = shell.execution_count
    names_before, out_before = _snapshot(shell)
    result, captured = run(shell, cell)
    assert result.success, captured.stdout + captured.stderr
    names_after, out_after = _snapshot(shell)
    labels, dry_run = _released_labels(result.result) if report else (set(), True)
    dropped = set() if dry_run else labels  # a dry run may name targets, never change them
    allowed = {"_i", "_ii", "_iii", f"_i{count}", "In", "_ih", "Out", "_oh"} | set(body_names) | dropped
    if result.result is not None:
        allowed |= {"_", "__", "___", f"_{count}"}
    changed = {name for name in names_before.keys() | names_after.keys() if names_before.get(name) != names_after.get(name)}
    assert changed <= allowed, (cell, changed - allowed)
    out_changed = {key for key in out_before.keys() | out_after.keys() if out_before.get(key) != out_after.get(key)}
    assert out_changed <= {count} | {key for key in out_before if f"Out[{key}]" in dropped}, (cell, out_changed)
    for label in dropped:  # and what it says it dropped, it did drop
        if label in names_before and label not in ("_", "__", "___", *body_names):
            assert label not in names_after, label
    return result.result


def test_only_reported_targets_change(shell, tiny_model):
    shell.user_ns["_test_path"] = tiny_model
    ok(shell, HOSTILE + PROXIES.replace("model_proxy = weakref.proxy(model)", "") + "import torch\nbystander = torch.ones(5)\nnumbers = [1, 2]")
    body = LOAD + "box = {'m': model, 'note': 'kept'}\n"
    _checked(shell, f"%%llmload $_test_path -o\n{body}", body_names={"model", "box", "AutoModelForCausalLM", "MODEL_NAME"})
    run(shell, "model")  # Out, _N and _ hold it now
    run(shell, "def step(m):\n    raise RuntimeError('simulated OOM')\nstep(model)")
    _checked(shell, f"%%llmload $_test_path -o\n{body}", body_names={"model", "box", "AutoModelForCausalLM", "MODEL_NAME"})
    _checked(shell, "%llmload $_test_path --no-tokenizer -o", body_names={"model", "MODEL_NAME"})
    _checked(shell, "%llmload $_test_path -o", body_names={"model", "tokenizer", "MODEL_NAME"})
    run(shell, "model")
    run(shell, "other = torch.nn.Linear(3, 3)")
    run(shell, "other")
    run(shell, "del other")
    _checked(shell, "%llmfree box['m'] --dry-run -o")
    assert "box" in shell.user_ns and "m" in shell.user_ns["box"]
    _checked(shell, "%llmfree --all --dry-run -o")
    _checked(shell, "%llmfree --hidden -o")
    _checked(shell, "%llmfree box['m'] -o")
    assert shell.user_ns["box"] == {"note": "kept"}  # one key dropped, the rest of `box` untouched
    _checked(shell, "%llmfree bystander tokenizer -o")
    _checked(shell, "%llmfree --all -o")
    _checked(shell, "%llmfree --hidden -o")
    for line in ("%gpustate", "%gpustate --all --deep", "%gpustate --json", "%gpustate -o"):
        _checked(shell, line, report=False)
    assert shell.user_ns["numbers"] == [1, 2]
