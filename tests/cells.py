"""Running cells in a test shell the way a notebook does, shared by the test modules."""

from __future__ import annotations

from IPython.utils.capture import capture_output

LOAD = "from transformers import AutoModelForCausalLM\nmodel = AutoModelForCausalLM.from_pretrained(MODEL_NAME)\n"


def run(shell, code):
    """Run a cell with history (output cache, tracebacks); fail on a syntax error. -> (result, captured)."""
    with capture_output() as captured:
        result = shell.run_cell(code, store_history=True)
    assert result.error_before_exec is None, captured.stdout + captured.stderr
    return result, captured


def ok(shell, code):
    """Run a cell that must succeed; return its value (a magic's `-o` result)."""
    result, captured = run(shell, code)
    assert result.success, captured.stdout + captured.stderr
    return result.result


def namespace_ids(shell) -> dict[str, int]:
    """Each user-namespace name and the id of its value: compare two to see what a cell changed."""
    return {name: id(value) for name, value in shell.user_ns.items()}


def changed_names(before: dict[str, int], after: dict[str, int]) -> set[str]:
    """Names added, removed or rebound between two `namespace_ids`, less IPython's bookkeeping."""
    changed = {name for name in before.keys() | after.keys() if before.get(name) != after.get(name)}
    return {name for name in changed if not name.startswith("_") and name not in ("In", "Out")}
