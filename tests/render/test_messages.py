"""Messages without seams: the magic named as typed, one list of choices, wrapping that follows
the terminal's width."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from cells import LOAD, ok, run
from rich.console import Console

from llm_magic.commands.autoload import DEVICE_MAP_CHOICES
from llm_magic.names import DTYPE_CHOICES
from llm_magic.render.core import Clauses
from llm_magic.render.load import render_load_report

README = Path(__file__).resolve().parents[2] / "README.md"


def printed(renderable, width: int) -> str:
    """What a terminal `width` columns wide shows."""
    console = Console(width=width, record=True, file=open("/dev/null", "w"), color_system=None)
    console.print(renderable)
    return console.export_text(styles=False)


# --- the magic's name as the user typed it ------------------------------------------------------


@pytest.mark.parametrize("code, name", [("%llmload", "%llmload"), ("%%llmload\nmodel = 1\n", "%%llmload")])
def test_missing_model_name_names_the_magic_as_typed(shell, code, name):
    result, captured = run(shell, code)
    output = captured.stdout + captured.stderr
    assert f"UsageError: {name} needs a MODEL_NAME" in output, output
    assert "model" not in shell.user_ns


def test_line_form_report_is_headed_by_the_line_form(shell, tiny_model):
    result, captured = run(shell, f"%llmload {tiny_model} --no-tokenizer -o")
    report = result.result
    assert report.magic == "%llmload"
    assert captured.stdout.lstrip().startswith(f"%llmload {tiny_model}\n"), captured.stdout[:200]
    assert "%%llmload" not in captured.stdout.splitlines()[0]


def test_cell_form_report_is_headed_by_the_cell_form(shell, tiny_model):
    shell.user_ns["path"] = tiny_model
    result, captured = run(shell, "%%llmload $path -o\n" + LOAD)
    report = result.result
    assert report.magic == "%%llmload" and report.model_name == tiny_model
    assert captured.stdout.lstrip().startswith(f"%%llmload {tiny_model}\n")


# --- help and README list the same choices ------------------------------------------------------


def test_help_lists_the_choices_from_the_one_constant(shell):
    help_text = re.sub(r"\s+", " ", shell.find_line_magic("llmload").__doc__)
    assert f"dtype ({', '.join(DTYPE_CHOICES)}; default: auto)" in help_text
    assert f"device_map ({', '.join(DEVICE_MAP_CHOICES)}; default: auto)" in help_text


@pytest.mark.parametrize("option, choices", [("--dtype", DTYPE_CHOICES), ("--device-map", DEVICE_MAP_CHOICES)])
def test_readme_lists_the_same_choices_as_the_help(option, choices):
    rows = [line for line in README.read_text(encoding="utf-8").splitlines() if line.startswith(f"| `{option} ")]
    assert len(rows) == 1, f"the README's option table has {len(rows)} rows for {option}"
    listed = re.findall(r"`([^`]+)`", rows[0].split("|")[2])
    assert tuple(listed) == choices, f"README lists {listed} for {option}; the help lists {list(choices)}"
    assert "(default)" in rows[0].split("|")[2].split(",")[0]


def test_bad_dtype_error_lists_the_same_choices(shell, tiny_model):
    result, captured = run(shell, f"%llmload {tiny_model} --dtype float8")
    assert ", ".join(DTYPE_CHOICES) in captured.stdout + captured.stderr


# --- wrapping follows the terminal's width ------------------------------------------------------

HEADROOM = "Generation headroom: KV cache 4 KiB/token on cpu: ~5,900,000 tokens fit at batch 1"


@pytest.mark.parametrize("width", range(36, 121, 6))  # from the longest clause (34 columns) up
def test_clauses_break_between_clauses_never_before_a_lone_word(width):
    lines = printed(Clauses(HEADROOM), width).rstrip("\n").split("\n")
    assert all(len(line) <= width for line in lines)
    assert " ".join(line.strip() for line in lines) == HEADROOM
    if len(HEADROOM) <= width:
        assert lines == [HEADROOM]
    for line in lines[:-1]:
        assert line.rstrip()[-1] in ":;,", f"line broken mid-clause at {width} columns: {lines}"
    assert len(lines[-1].split()) > 1


def test_load_report_headroom_line_at_80_columns(shell, tiny_model):
    report = ok(shell, f"%llmload {tiny_model} --no-tokenizer -o")
    text = printed(render_load_report(report), 80)
    start = text.index("Generation headroom")
    block = text[start:].split("\n\n")[0].rstrip("\n").split("\n")
    assert len(block[-1].split()) > 1, f"the headroom line ends with a lone word at 80 columns:\n{block}"
    assert all(line.rstrip()[-1] in ":;," for line in block[:-1]), block


def test_table_hint_uses_the_terminal_width(shell, tiny_model):
    # A model the cell does not replace is kept; the hint under that narrow table used to wrap
    # to the table's width (about 50 columns) even in a 120-column terminal.
    ok(shell, f"from transformers import AutoModelForCausalLM\nother = AutoModelForCausalLM.from_pretrained({tiny_model!r})\n")
    report = ok(shell, f"%llmload {tiny_model} --no-tokenizer -o")
    hint = "free them with %llmfree NAME ..., or reload with %%llmload --release-all"
    wide = printed(render_load_report(report), 120)
    assert hint in wide.splitlines() or any(line.strip() == hint for line in wide.splitlines()), wide
    narrow = printed(render_load_report(report), 50)
    assert "free them with %llmfree NAME ...," in narrow and "or reload with %%llmload --release-all" in narrow
