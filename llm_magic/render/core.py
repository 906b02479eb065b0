"""The shared pieces of rendering: styles, tables, sections, and showing a renderable as
coloured text in a terminal or HTML in a notebook.

Each command's report has its own module here (load, release, gpustate, oom, ...). Every
renderer takes plain report data and returns a rich renderable; nothing here measures or
changes anything.
"""

from __future__ import annotations

from typing import Any, Iterable

from rich import box
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

# Explicit colours that keep a 3:1 contrast on light and dark notebook themes alike (rich's
# named "red" exports as #800000, unreadable on a dark background).


WARN = "bold #d32f2f"


OK = "#2e7d32"


HEADING = "bold #00838f"
HIDDEN_STYLE = "#b26a00"
UNNAMED_STYLE = "#8e24aa"


DIM = "dim"


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
    """Sections one under the other, a blank line before each table so titles stand apart."""
    stacked: list[Any] = []
    for part in parts:
        if part is None:
            continue
        if stacked and isinstance(part, (Table, Panel)):
            stacked.append(Text(""))
        stacked.append(part)
    return Group(*stacked)


def warnings_panel(warnings: Iterable[str]) -> Panel | None:
    warnings = list(warnings)
    if not warnings:
        return None
    body = Text("\n".join(f"⚠ {w}" for w in warnings), style=WARN)
    return Panel(body, title="Warning", title_align="left", border_style="red", box=box.HEAVY)


def mimebundle(renderable, width: int = 110) -> dict[str, str]:
    """text/plain (no colour codes) and text/html (inline styles) for one renderable."""
    # force_jupyter=False: in a kernel, a recording console would otherwise display its own copy.
    console = Console(
        record=True, width=width, file=_Discard(), color_system="truecolor", force_terminal=True, force_jupyter=False
    )
    console.print(renderable)
    html = console.export_html(inline_styles=True, code_format=_HTML_FORMAT, clear=False)
    text = console.export_text(clear=True, styles=False)
    return {"text/plain": text, "text/html": html}


_HTML_FORMAT = (
    '<pre class="llm-magic" style="white-space:pre;overflow-x:auto;line-height:1.35;'
    "font-family:Menlo,'DejaVu Sans Mono',Consolas,'Courier New',monospace;font-size:13px\">"
    "<code>{code}</code></pre>"
)


class _Discard:
    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


def show(renderable) -> None:
    """Print in a terminal (with colour when it is one); display HTML in a notebook."""
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
