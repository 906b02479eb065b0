"""render/html.py: any report renderable as semantic, escaped HTML themed by the notebook.

The converter is generic (rich Table, Text, Panel, Group), so these tests build renderables the
way the report modules do (render/core.py helpers), then check real reports from a real shell.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest
from cells import ok

from llm_magic.render.core import (
    DIM,
    OK,
    WARN,
    Clauses,
    mimebundle,
    new_table,
    stack,
    warnings_panel,
)
from llm_magic.render.html import CSS, to_html

ANSI = re.compile(r"\x1b\[")


class Tree(HTMLParser):
    """The elements of an HTML fragment: (tag, attrs, text inside) in document order, and a
    check that every element is closed in order (no broken markup from an unescaped name)."""

    VOID = {"br", "hr", "img", "meta", "link", "input"}

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.elements: list[dict] = []
        self.open: list[dict] = []
        self.feed(html)
        self.close()
        assert not self.open, f"unclosed: {[e['tag'] for e in self.open]}"

    def handle_starttag(self, tag, attrs):
        element = {"tag": tag, "attrs": dict(attrs), "text": ""}
        self.elements.append(element)
        if tag not in self.VOID:
            self.open.append(element)

    def handle_endtag(self, tag):
        assert self.open and self.open[-1]["tag"] == tag, f"</{tag}> closes {self.open[-1]['tag'] if self.open else None}"
        self.open.pop()

    def handle_data(self, data):
        for element in self.open:
            element["text"] += data

    def find(self, tag: str, cls: str | None = None) -> list[dict]:
        return [e for e in self.elements if e["tag"] == tag and (cls is None or cls in e["attrs"].get("class", "").split())]


def body(html: str) -> str:
    """The HTML without its style sheet."""
    return html.split("</style>", 1)[1]


def sample_table():
    table = new_table("Released", ("object", "left"), ("memory", "right"), ("status", "left"))
    table.add_row("model", "13 MiB cpu", "freed ✓")
    table.add_row("big", "1.2 GiB cuda:0", "NOT freed", style=WARN)
    table.caption = "free them with %llmfree NAME ..."
    return table


def test_table_becomes_a_table_with_header_cells_and_right_aligned_numbers():
    tree = Tree(to_html(stack([sample_table()])))
    (table,) = tree.find("table", "lm-table")
    (caption,) = tree.find("caption")
    assert caption["text"] == "Released"
    headers = tree.find("th")
    assert [h["text"] for h in headers] == ["object", "memory", "status"]
    assert all(h["attrs"].get("scope") == "col" for h in headers)
    assert [h["attrs"].get("class") for h in headers] == [None, "lm-num", None]
    cells = tree.find("td")
    assert [c["text"] for c in cells] == ["model", "13 MiB cpu", "freed ✓", "big", "1.2 GiB cuda:0", "NOT freed"]
    assert [c["attrs"].get("class") for c in cells] == [None, "lm-num", None] * 2
    # The row style says what the row means; the caption is a note under the table.
    rows = tree.find("tr")
    assert rows[2]["attrs"]["class"].split() == ["lm-warn", "lm-bold"]
    (note,) = [e for e in tree.find("div", "lm-line") if "llmfree" in e["text"]]
    assert "lm-dim" in Tree(to_html(Clauses("x", style=DIM))).find("span")[0]["attrs"]["class"]
    assert note["text"] == "free them with %llmfree NAME ..."


def test_styles_become_classes_by_meaning_not_inline_colours():
    html = to_html(stack([Clauses("Freed: 13 MiB", style=OK), warnings_panel(["model on disk"])]))
    assert "#2e7d32" not in body(html) and "style=" not in body(html)
    tree = Tree(html)
    (freed,) = [s for s in tree.find("span") if s["text"] == "Freed: 13 MiB"]
    assert freed["attrs"]["class"] == "lm-ok"
    (warning,) = tree.find("div", "lm-panel-warn")
    assert warning["text"] == "Warning⚠ model on disk"
    assert "lm-warn" in tree.find("span")[-1]["attrs"]["class"]


def test_warning_panel_is_a_block_without_box_characters():
    bundle = mimebundle(stack([warnings_panel(["model has 29 modules on disk: generation will be very slow"])]))
    assert "┏" in bundle["text/plain"]  # the terminal keeps its box
    assert not re.search(r"[┏┃┗━]", bundle["text/html"])
    assert 'class="lm-panel lm-panel-warn" role="note"' in bundle["text/html"]


@pytest.mark.parametrize(
    "name",
    ['<script>alert("x")</script>', "d['a & b']", 'models["量子 模型"]', "results[0].model", "a\u200bb <i>"],
)
def test_every_name_is_escaped_and_kept_whole(name):
    table = new_table(f"Holders of {name}", ("holder", "left"), ("memory", "right"))
    table.add_row(name, "1 MiB cpu")
    html = to_html(stack([table, Clauses(f"{name}: kept")]))
    assert "<script>" not in html and "<i>" not in html
    tree = Tree(html)
    assert tree.find("caption")[0]["text"] == f"Holders of {name}"
    assert tree.find("td")[0]["text"] == name
    assert any(e["text"] == f"{name}: kept" for e in tree.find("div", "lm-line"))


def test_other_renderables_fall_back_to_their_text():
    from rich.rule import Rule

    tree = Tree(to_html(stack([Rule("section"), Clauses("after")])))
    (pre,) = tree.find("pre", "lm-pre")
    assert "section" in pre["text"]


def test_style_sheet_uses_theme_variables_with_fallbacks():
    for variable in ("--jp-error-color1", "--vscode-errorForeground", "--jp-success-color1", "--jp-border-color2"):
        assert variable in CSS
    # Each colour is mixed with the text colour, so it darkens on light themes and lightens on dark.
    assert "color-mix(in srgb, var(--lm-warn) 70%, currentColor)" in CSS
    # Scoped: nothing outside the report is restyled.
    for rule in re.findall(r"(?:^|})([^{}]+)\{", CSS):
        assert all(selector.strip().startswith(".llm-magic") for selector in rule.split(",")), rule


def test_mimebundle_plain_text_has_no_colour_codes_or_trailing_spaces():
    bundle = mimebundle(stack([sample_table(), warnings_panel(["slow"])]))
    assert not ANSI.search(bundle["text/plain"])
    assert all(line == line.rstrip() for line in bundle["text/plain"].splitlines())
    assert bundle["text/html"].startswith('<div class="llm-magic"><style>')


def test_a_table_inside_a_group_is_stacked_like_any_table():
    """Reports return Group(table, note) when a walk was cut: the table still gets its blank
    line above and its caption as a line of its own (not wrapped to the table's width)."""
    from rich.console import Group
    from rich.text import Text

    table = sample_table()
    table.caption = "free them with %llmfree NAME ..., or reload with %%llmload --release-all"
    lines = mimebundle(stack([Text("heading"), Group(table, Text("the search stopped early"))]))["text/plain"].splitlines()
    assert lines[:2] == ["heading", ""]
    assert "free them with %llmfree NAME ..., or reload with %%llmload --release-all" in lines
    assert lines[-1] == "the search stopped early"


def test_mimebundle_makes_only_the_formats_ipython_asks_for():
    renderable = stack([sample_table()])
    assert set(mimebundle(renderable, include={"text/plain"})) == {"text/plain"}
    assert set(mimebundle(renderable, exclude={"text/plain"})) == {"text/html"}
    assert set(mimebundle(renderable, include={"text/html", "text/plain"}, exclude={"text/html"})) == {"text/plain"}


# --- real reports from a real shell ----------------------------------------------------------------


def test_load_report_with_disk_offload_as_html(shell, tiny_model, tmp_path):
    ok(shell, f"from transformers import AutoModelForCausalLM\nmodel = AutoModelForCausalLM.from_pretrained({tiny_model!r})\n")
    report = ok(
        shell,
        f"%%llmload {tiny_model} -o\n"
        "model = AutoModelForCausalLM.from_pretrained(MODEL_NAME, device_map='auto', "
        f"max_memory={{'cpu': 300_000}}, offload_folder={str(tmp_path / 'off')!r})\n",
    )
    bundle = report._repr_mimebundle_()
    assert set(report._repr_mimebundle_(include={"text/plain"})) == {"text/plain"}  # IPython's include honoured
    tree = Tree(bundle["text/html"])
    captions = [c["text"] for c in tree.find("caption")]
    assert captions[0] == "Released" and captions[1].startswith("model: LlamaForCausalLM")
    assert "Free memory" in captions
    devices = [row["text"] for row in tree.find("tr")]
    assert any(text.startswith("cpu") for text in devices) and any(text.startswith("disk") for text in devices)
    (warning,) = tree.find("div", "lm-panel-warn")
    assert "on disk" in warning["text"]
    # The plain text keeps every fact the HTML shows.
    assert "Released" in bundle["text/plain"] and "disk" in bundle["text/plain"] and "on disk" in bundle["text/plain"]


def test_gpustate_report_as_html(shell, tiny_model):
    ok(shell, f"from transformers import AutoModelForCausalLM\nmodel = AutoModelForCausalLM.from_pretrained({tiny_model!r})\n")
    from llm_magic.render.gpustate import render_gpustate

    state = ok(shell, "%gpustate --all -o")
    tree = Tree(to_html(render_gpustate(state)))
    (memory,) = [t for t in tree.find("table") if t["text"].startswith("Memory")]
    assert "cpu" in memory["text"]
    holders = [t for t in tree.find("table") if t["text"].startswith("Holders")]
    assert holders and "model" in holders[0]["text"]
    assert tree.find("div", "lm-heading-line")[0]["text"] == "%gpustate"
