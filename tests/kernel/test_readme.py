"""README.md works as written: every example that claims to run does, its sample output is what
the code prints now, and what it says about the commands is true. The conventions are in
tests/support/readme.py and in the README's "Contributing" section."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from support.readme import (
    README,
    SHOWN_MODEL_PATH,
    blocks,
    expected_outputs,
    normalise,
    run_session,
)

ROOT = README.parent
TEXT = README.read_text(encoding="utf-8")
BLOCKS = blocks(TEXT)


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """Every `check: ipython` block run in one real InteractiveShell, in README order."""
    from support.demo import build_demo_model

    model = build_demo_model(tmp_path_factory.mktemp("readme-model") / "demo-model")
    results = run_session(BLOCKS, model, tmp_path_factory.mktemp("readme-cwd"))
    return model, results


def test_every_fenced_block_says_whether_it_runs():
    unmarked = [f"line {block.line}: ```{block.language}" for block in BLOCKS if not block.kind]
    assert not unmarked, "fenced blocks without a <!-- check: ... -->, <!-- output --> or <!-- not run: ... --> comment:\n" + "\n".join(unmarked)
    assert sum(block.kind == "check: ipython" for block in BLOCKS) >= 3
    assert sum(block.kind == "output" for block in BLOCKS) >= 2


def test_ipython_examples_run_as_written(session):
    _, results = session
    ran = 0
    for runs in results.values():
        for run in runs:
            ran += 1
            if run.number:
                assert run.number == run.execution_count, f"README says In [{run.number}], IPython numbers it {run.execution_count}"
            if "# raises" in run.source:
                assert run.error is not None, f"In [{run.number}] should raise:\n{run.source}"
            else:
                assert run.error is None, f"In [{run.number}] failed: {run.error!r}\n{run.source}\n{run.stdout}"
            assert "UsageError" not in run.stdout, run.stdout
    assert ran >= 8


def test_sample_output_is_what_the_code_prints_now(session):
    model, results = session
    for index, expected in expected_outputs(BLOCKS, results, model).items():
        block = BLOCKS[index]
        assert normalise(block.code) == normalise(expected), (
            f"README line {block.line}: the sample output is out of date; "
            f"run `python tests/support/readme.py` to regenerate it. Now the code prints:\n{expected}"
        )


def test_sample_output_shows_the_reports_the_readme_describes(session):
    model, results = session
    outputs = "\n".join(expected_outputs(BLOCKS, results, model).values())
    for heading in ("Memory", "Holders", "Released", "Free memory", "change (system-wide)", "Generation headroom"):
        assert heading in outputs
    assert f"%%llmload {SHOWN_MODEL_PATH}" in outputs and "freed ✓" in outputs and "disk" in outputs
    assert "━━━━━━━━" not in re.sub(r"┏.*┓|┗.*┛", "", outputs), "a heavy table rule is back"


def test_llmload_examples_pass_a_variable_with_a_dollar():
    # `%%llmload path` would pass the literal string "path".
    for block in BLOCKS:
        for line in block.code.splitlines():
            match = re.search(r"%%?llmload\s+([A-Za-z_]\w*)\b(?!/)", line)
            if match and match.group(1) not in ("MODEL_NAME",) and block.kind != "output":
                assert match.group(1).startswith("$") or "/" in match.group(1), line


def test_ci_commands_are_run_by_ci():
    run_script = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    commands = [
        line.split("#", 1)[0].strip()
        for block in BLOCKS
        if block.kind == "check: ci"
        for line in block.code.splitlines()
        if line.split("#", 1)[0].strip()
    ]
    assert commands == ["bash .ci/demo", "bash .ci/test"]
    for command in commands:
        assert re.search(rf"^\s*{re.escape(command)}\b", run_script, re.MULTILINE), f".ci/run does not run {command!r}"


def test_readme_describes_both_notebooks():
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        assert f"`{notebook.name}`" in TEXT, f"{notebook.name} is not described in the README"


def test_torch_variables_are_documented_and_used():
    env_script = (ROOT / ".ci" / "env").read_text(encoding="utf-8")
    for variable in ("TORCH_SPEC", "TORCH_INDEX_URL", "TORCH_EXTRA_INDEX_URL"):
        assert f"`{variable}`" in TEXT and variable in env_script
    assert "--index-url" in env_script and "--extra-index-url" in env_script
    assert re.search(r"Set-up times, measured on 2 CPU cores.*about \d+ minutes?", TEXT, re.DOTALL), "set-up times not stated"


# --- the README's commands, cheaply --------------------------------------------------------------


def _venv() -> tuple[Path, str] | None:
    """(venv root, environment name) when this interpreter is a .ci/env environment."""
    prefix = Path(sys.prefix)
    return (prefix.parent, prefix.name) if prefix.name in ("tf5", "tf4") else None


@pytest.mark.parametrize("with_name", [True, False], ids=["tf-name", "no-name"])
def test_ci_test_passes_pytest_arguments_with_or_without_an_environment_name(with_name):
    venv = _venv()
    if venv is None:
        pytest.skip("not running in a .ci/env environment (tf5/tf4)")
    root, name = venv
    if not with_name and name != "tf5":
        pytest.skip("without a name .ci/test uses tf5; this run is " + name)
    arguments = ([name] if with_name else []) + ["--collect-only", "-q", "-p", "no:cacheprovider", "tests/render/test_messages.py", "-k", "choices"]
    env = {**os.environ, "LLM_MAGIC_VENV_ROOT": str(root)}
    done = subprocess.run(["bash", ".ci/test", *arguments], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:] + done.stdout[-2000:]
    assert "unknown environment" not in done.stderr
    assert re.search(r"\d+/\d+ tests collected|\d+ tests? collected", done.stdout), done.stdout
    # .ci/env says which torch build it installed.
    assert re.search(rf"\[{name}\] torch \S+ \((CPU|CUDA \S+|ROCm \S+) build\)", done.stderr), done.stderr[-1000:]
