"""The shared pieces of rendering: styles, tables, sections, and showing a renderable as
coloured text in a terminal or HTML in a notebook.

Each command's report has its own module here (load, release, gpustate, oom, ...). Every
renderer takes plain report data and returns a rich renderable; nothing here measures or
changes anything.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Iterator

from rich import box
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from llm_magic.engine.walk import SEARCH_EVERYTHING, cut_names

# The report's colours, by meaning. The terminal shows these colours (explicit ones: rich's
# named "red" is #800000, unreadable on a dark background); the HTML renderer (render/html.py)
# maps each back to its meaning, a CSS class coloured from the notebook's own theme.
PALETTE = {
    "warn": "#d32f2f",
    "ok": "#2e7d32",
    "heading": "#00838f",
    "hidden": "#b26a00",
    "unnamed": "#8e24aa",
}

WARN = f"bold {PALETTE['warn']}"
OK = PALETTE["ok"]
HEADING = f"bold {PALETTE['heading']}"
HIDDEN_STYLE = PALETTE["hidden"]
UNNAMED_STYLE = PALETTE["unnamed"]
DIM = "dim"

# Text-only output (text/plain in a notebook, logs) is this wide; a terminal uses its own width.
PLAIN_WIDTH = 110


def new_table(title: str, *columns: tuple[str, str]) -> Table:
    # min_width keeps a short table from wrapping its own title.
    # SIMPLE_HEAD without edges: no blank lines around the rows, so a report stays compact.
    table = Table(
        title=title, title_justify="left", title_style="bold", box=box.SIMPLE_HEAD, show_edge=False,
        pad_edge=False, min_width=min(len(title) + 2, 100),
    )
    for name, justify in columns:
        table.add_column(name, justify=justify, no_wrap=justify == "right")
    return table


def stack(parts: Iterable[Any]) -> Group:
    """Sections one under the other, a blank line before each table so titles stand apart.

    A table's caption (a hint such as "free them with %llmfree NAME") becomes a line of its own
    under the table: rich wraps a caption to the table's width, which for a narrow table cuts a
    one-line hint into three in a wide terminal.
    """
    stacked: list[Any] = []
    for part in _flattened(parts):
        if stacked and isinstance(part, (Table, Panel)):
            stacked.append(Text(""))
        stacked.append(part)
        caption = part.caption if isinstance(part, Table) else None
        if caption:
            part.caption = None
            stacked.append(caption if isinstance(caption, Text) else Clauses(str(caption), style=DIM))
    return Group(*stacked)


def cut_note(cut, inside: str = "holders") -> str:
    """The sentence for walks cut at their budget: which roots, and how to see everything."""
    return f"the search stopped early in {cut_names(cut)} (too many objects): {inside} inside may be missing — {SEARCH_EVERYTHING}"


def _flattened(parts: Iterable[Any]) -> Iterator[Any]:
    """The parts, with groups opened (a table inside one gets its blank line and caption too)."""
    for part in parts:
        if isinstance(part, Group):
            yield from _flattened(part.renderables)
        elif part is not None:
            yield part


class Clauses:
    """One line of prose that, when it does not fit, breaks between its clauses (after ": ",
    "; " or ", ") instead of wherever the width runs out, so no line ends with a lone word
    ("... tokens fit at batch" / "1"); continuation lines are indented. A terminal's width
    decides; the HTML renderer shows `plain` and lets the page wrap it.
    """

    INDENT = "  "

    def __init__(self, plain: str, style: str | None = None):
        self.plain = plain
        self.style = style

    def __str__(self) -> str:
        return self.plain

    def pieces(self) -> list[str]:
        return re.split(r"(?<=[:;,]) (?=\S)", self.plain)

    def lines(self, width: int) -> list[str]:
        """The line broken at clause boundaries to fit `width` columns (a clause wider than
        that stays whole: rich then wraps it at words)."""
        from rich.cells import cell_len

        lines: list[str] = []
        for piece in self.pieces():
            if lines and cell_len(f"{lines[-1]} {piece}") <= width:
                lines[-1] = f"{lines[-1]} {piece}"
            else:
                lines.append(piece if not lines else self.INDENT + piece)
        return lines

    def __rich_console__(self, console, options):
        for line in self.lines(options.max_width):
            yield Text(line, style=self.style or "")

    def __rich_measure__(self, console, options):
        from rich.cells import cell_len
        from rich.measure import Measurement

        return Measurement(max(map(cell_len, self.pieces())), cell_len(self.plain))


def warnings_panel(warnings: Iterable[str]) -> Panel | None:
    warnings = list(warnings)
    if not warnings:
        return None
    body = Text("\n".join(f"⚠ {w}" for w in warnings), style=WARN)
    return Panel(body, title="Warning", title_align="left", border_style=PALETTE["warn"], box=box.HEAVY)


def mimebundle(renderable, width: int = PLAIN_WIDTH, include=None, exclude=None) -> dict[str, str]:
    """text/plain (what a terminal shows, without colour codes) and text/html (semantic HTML
    styled by the notebook's theme, see render/html.py) for one renderable. `include` and
    `exclude` are IPython's `_repr_mimebundle_` arguments: only the formats asked for are made."""
    from llm_magic.render.html import to_html

    def wanted(mime: str) -> bool:
        return (not include or mime in include) and not (exclude and mime in exclude)

    bundle = {}
    if wanted("text/html"):
        bundle["text/html"] = to_html(renderable)
    if not wanted("text/plain"):
        return bundle
    # force_jupyter=False: in a kernel, a recording console would otherwise display its own copy.
    console = Console(record=True, width=width, file=_Discard(), force_terminal=True, force_jupyter=False)
    console.print(renderable)
    # rich pads a table's title to the table's width: trailing spaces help no reader or log.
    bundle["text/plain"] = "\n".join(line.rstrip() for line in console.export_text(clear=True, styles=False).split("\n"))
    return bundle


class _Discard:
    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


def show(renderable) -> None:
    """Print in a terminal (with colour when it is one, at its width); display HTML in a notebook."""
    if _in_kernel():
        from IPython.display import display

        display(mimebundle(renderable), raw=True)
    else:
        Console().print(renderable)


def _in_kernel() -> bool:
    # rich's own test reads the builtin `get_ipython`, which IPython sets only while a cell
    # runs: from a post_run_cell callback the HTML would come out as ANSI text.
    from IPython import get_ipython

    shell = get_ipython()
    return shell is not None and (type(shell).__name__ == "ZMQInteractiveShell" or "google.colab" in type(shell).__module__)


def without_empty_columns(title: str, columns: list[tuple[str, str]], rows: list[tuple[list, Any]]) -> Table:
    """A table of `rows` ((cells, style) pairs) leaving out columns that are empty in every row."""
    keep = [i for i in range(len(columns)) if any(cells[i] for cells, _ in rows)]
    table = new_table(title, *(columns[i] for i in keep))
    for cells, style in rows:
        table.add_row(*(cells[i] for i in keep), style=style)
    return table
