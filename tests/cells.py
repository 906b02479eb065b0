"""Running cells in a test shell the way a notebook does, shared by the test modules."""

from __future__ import annotations

import re

from IPython.utils.capture import capture_output

LOAD = "from transformers import AutoModelForCausalLM\nmodel = AutoModelForCausalLM.from_pretrained(MODEL_NAME)\n"


def run(shell, code, *, fails: bool | None = None):
    """Run a cell with history (output cache, tracebacks); fail on a syntax error. -> (result, captured).

    fails: assert that the cell raised (True) or did not (False); None: either is fine.
    """
    with capture_output() as captured:
        result = shell.run_cell(code, store_history=True)
    assert result.error_before_exec is None, captured.stdout + captured.stderr
    if fails is not None:
        assert (result.error_in_exec is not None) == fails, (captured.stdout + captured.stderr)[-2000:]
    return result, captured


def llmload(shell, path, body=LOAD, options="-o"):
    """Run `%%llmload PATH OPTIONS` over `body` (default: LOAD). -> (result, captured)."""
    shell.user_ns["_test_path"] = path
    return run(shell, f"%%llmload $_test_path {options}\n{body}")


def run_text(shell, code):
    """Run a cell; (result, its output without colour codes, whitespace runs as one space: rich
    wraps at the terminal's width)."""
    result, captured = run(shell, code)
    output = re.sub(r"\x1b\[[0-9;]*m", "", captured.stdout + captured.stderr)
    return result, " ".join(output.split())


def ok(shell, code):
    """Run a cell that must succeed; return its value (a magic's `-o` result)."""
    result, captured = run(shell, code)
    assert result.success, captured.stdout + captured.stderr
    return result.result


def namespace_ids(shell) -> dict[str, int]:
    """Each user-namespace name and the id of its value: compare two to see what a cell changed."""
    return {name: id(value) for name, value in shell.user_ns.items()}


def hidden_ids(shell) -> dict[str, int]:
    """The ids the hidden copies hold (`Out[n]`, `_`, `__`, `___`): what `changed_names` leaves out."""
    ids = {f"Out[{number}]": id(value) for number, value in shell.user_ns["Out"].items()}
    ids.update({name: id(shell.user_ns[name]) for name in ("_", "__", "___") if name in shell.user_ns})
    return ids


def changed_names(before: dict[str, int], after: dict[str, int]) -> set[str]:
    """Names added, removed or rebound between two `namespace_ids`, less IPython's bookkeeping."""
    changed = {name for name in before.keys() | after.keys() if before.get(name) != after.get(name)}
    return {name for name in changed if not name.startswith("_") and name not in ("In", "Out")}
