"""Any report renderable as semantic HTML for a notebook, styled by the notebook's own theme.

The reports are built once, as rich renderables (render/core.py and the per-report modules);
rich prints them in a terminal. This module turns the same objects into HTML, generically, so a
new report needs no HTML code of its own:

- `Table` -> `<table>`: its title as `<caption>`, a `<th>` per column, a `<tr>` per row; a
  column with `justify="right"` gets right-aligned, tabular-figure cells;
- `Text` -> its text, with each styled run as a `<span>` whose classes say what the style
  means (core.PALETTE: warn, ok, heading, hidden, unnamed; plus bold, italic, dim);
- a `Panel` -> a block with its title (the warning panel: a tinted block with a red bar);
- `Group` -> its parts in order; `core.Clauses` -> a line the page wraps;
- anything else -> the text rich would print, in `<pre>`.

Colours come from the theme's variables (JupyterLab's `--jp-*`, VS Code's `--vscode-*`), each
mixed with the text colour so it keeps its contrast on light and dark backgrounds alike; where
neither exists (Colab, nbviewer) a fixed hue mixed with the text colour is the fallback. Every
piece of text is escaped.
"""

from __future__ import annotations

from html import escape
from typing import Any, Iterator

from rich.console import Console, Group
from rich.panel import Panel
from rich.style import Style
from rich.table import Table
from rich.text import Text

from llm_magic.render.core import PALETTE, PLAIN_WIDTH, Clauses, _Discard

# A meaning per colour: the palette's own, plus rich's named colours in case a report uses them.
_MEANING_BY_COLOR = {colour.lower(): name for name, colour in PALETTE.items()} | {
    "red": "warn",
    "bright_red": "warn",
    "green": "ok",
    "cyan": "heading",
    "yellow": "hidden",
    "magenta": "unnamed",
}

# The hue of each meaning: the theme's variable where there is one, then VS Code's, then a fixed
# colour. Text uses it mixed 70/30 with the text colour (currentColor): darker on a light theme,
# lighter on a dark one, so it stays readable (>= 4.5:1) on both.
_HUES = {
    "warn": "var(--jp-error-color1, var(--vscode-errorForeground, #e53935))",
    "ok": "var(--jp-success-color1, var(--vscode-testing-iconPassed, #43a047))",
    "heading": "var(--jp-info-color1, var(--vscode-textLink-foreground, #00acc1))",
    "hidden": "var(--jp-warn-color1, var(--vscode-editorWarning-foreground, #fb8c00))",
    "unnamed": "var(--vscode-symbolIcon-classForeground, #ab47bc)",
}

_BORDER = "var(--jp-border-color2, var(--vscode-editorWidget-border, color-mix(in srgb, currentColor 25%, transparent)))"

CSS = (
    ".llm-magic{"
    + "".join(f"--lm-{name}:{hue};" for name, hue in _HUES.items())
    + "font-family:var(--jp-content-font-family, var(--vscode-font-family, inherit));"
    "font-size:var(--jp-content-font-size1, 14px);line-height:1.45;max-width:100%;overflow-wrap:anywhere}"
    + "".join(
        f".llm-magic .lm-{name}{{color:color-mix(in srgb, var(--lm-{name}) 70%, currentColor)}}" for name in _HUES
    )
    + ".llm-magic .lm-bold{font-weight:600}.llm-magic .lm-italic{font-style:italic}"
    ".llm-magic .lm-underline{text-decoration:underline}"
    ".llm-magic .lm-dim{opacity:1;color:color-mix(in srgb, currentColor 72%, transparent)}"
    ".llm-magic .lm-line{margin:.2em 0;white-space:pre-wrap}"
    ".llm-magic .lm-heading-line{margin:.1em 0 .45em;font-weight:600;font-family:var(--jp-code-font-family, monospace)}"
    ".llm-magic table.lm-table{border-collapse:collapse;margin:.7em 0 .35em;width:auto;max-width:100%;"
    "table-layout:auto;font-size:inherit;color:inherit;border:none}"
    ".llm-magic table.lm-table caption{caption-side:top;text-align:left;font-weight:600;padding:0 0 .3em;"
    "color:inherit;white-space:normal}"
    ".llm-magic table.lm-table th,.llm-magic table.lm-table td{padding:.2em .9em .2em 0;text-align:left;"
    "vertical-align:top;border:none;background:none;white-space:normal;overflow-wrap:anywhere;max-width:none}"
    ".llm-magic table.lm-table th{font-weight:600;border-bottom:1px solid " + _BORDER + "}"
    ".llm-magic table.lm-table tbody tr{background:none}"
    ".llm-magic table.lm-table tbody tr+tr td{border-top:1px solid color-mix(in srgb, currentColor 8%, transparent)}"
    ".llm-magic table.lm-table .lm-num{text-align:right;white-space:nowrap;font-variant-numeric:tabular-nums;"
    "overflow-wrap:normal}"
    ".llm-magic table.lm-table tr>:last-child{padding-right:0}"
    ".llm-magic .lm-panel{margin:.5em 0;padding:.45em .8em;border-left:4px solid "
    "color-mix(in srgb, var(--lm-heading) 70%, currentColor);background:color-mix(in srgb, var(--lm-heading) 8%, transparent)}"
    ".llm-magic .lm-panel.lm-panel-warn{border-left-color:color-mix(in srgb, var(--lm-warn) 80%, currentColor);"
    "background:color-mix(in srgb, var(--lm-warn) 10%, transparent)}"
    ".llm-magic .lm-panel-title{font-weight:600;margin-bottom:.15em}"
    ".llm-magic .lm-panel .lm-line{margin:.1em 0}"
    ".llm-magic pre.lm-pre{margin:.3em 0;white-space:pre-wrap;font-family:var(--jp-code-font-family, monospace)}"
)


def to_html(renderable: Any) -> str:
    """The renderable as one `<div class="llm-magic">` with its own scoped style sheet."""
    console = _console()
    body = "".join(_blocks(renderable, console))
    return f'<div class="llm-magic"><style>{CSS}</style>{body}</div>'


def _console() -> Console:
    # Only to parse styles and markup the way a terminal print would; nothing is printed.
    return Console(file=_Discard(), width=PLAIN_WIDTH, force_terminal=False, force_jupyter=False)


def _blocks(renderable: Any, console: Console) -> Iterator[str]:
    if renderable is None:
        return
    if isinstance(renderable, Group):
        for part in renderable.renderables:
            yield from _blocks(part, console)
    elif isinstance(renderable, Table):
        yield from _table(renderable, console)
    elif isinstance(renderable, Panel):
        yield _panel(renderable, console)
    elif isinstance(renderable, (Text, Clauses, str)):
        line = _inline(renderable, console)
        if line.strip():  # the blank Text that spaces sections in a terminal: CSS margins do that here
            yield f'<div class="{_line_class(renderable, console)}">{line}</div>'
    else:
        yield f'<pre class="lm-pre">{escape(_plain(renderable))}</pre>'


def _line_class(renderable: Any, console: Console) -> str:
    # A line entirely in the heading style (a report's first line) is the report's heading.
    meaning = _classes(_style(getattr(renderable, "style", None), console))
    return "lm-line lm-heading-line" if "lm-heading" in meaning else "lm-line"


def _table(table: Table, console: Console) -> Iterator[str]:
    numeric = [column.justify == "right" for column in table.columns]
    yield '<table class="lm-table">'
    if table.title:
        yield f"<caption>{_inline(table.title, console)}</caption>"
    if table.show_header:
        headers = "".join(
            f'<th scope="col"{_cell_class(right)}>{_inline(column.header, console)}</th>'
            for column, right in zip(table.columns, numeric)
        )
        yield f"<thead><tr>{headers}</tr></thead>"
    yield "<tbody>"
    for index, row in enumerate(table.rows):
        classes = _classes(_style(row.style, console))
        cells = "".join(
            f"<td{_cell_class(right)}>{_inline(column._cells[index], console)}</td>"
            for column, right in zip(table.columns, numeric)
        )
        yield f'<tr class="{" ".join(classes)}">{cells}</tr>' if classes else f"<tr>{cells}</tr>"
    yield "</tbody></table>"
    if table.caption:
        yield f'<div class="lm-line lm-dim">{_inline(table.caption, console)}</div>'


def _cell_class(right: bool) -> str:
    return ' class="lm-num"' if right else ""


def _panel(panel: Panel, console: Console) -> str:
    meaning = _classes(_style(panel.border_style, console))
    kind = " lm-panel-warn" if "lm-warn" in meaning else ""
    title = f'<div class="lm-panel-title">{_inline(panel.title, console)}</div>' if panel.title else ""
    body = "".join(_blocks(panel.renderable, console))
    return f'<div class="lm-panel{kind}" role="note">{title}{body}</div>'


def _inline(content: Any, console: Console) -> str:
    """Text, a markup string or a Clauses line as escaped HTML with a span per styled run."""
    if isinstance(content, Clauses):
        content = Text(content.plain, style=content.style or "")
    elif isinstance(content, str):
        content = console.render_str(content, highlight=False)  # markup such as "[bold]x[/]", as a table prints it
    elif not isinstance(content, Text):
        return f'<span class="lm-pre">{escape(_plain(content))}</span>'
    runs: list[tuple[tuple[str, ...], str]] = []
    base = _style(content.style, console) or Style()  # Text.render leaves the base style to its caller
    for segment in content.render(console, end=""):
        classes = tuple(_classes(base + segment.style if segment.style else base))
        if runs and runs[-1][0] == classes:
            runs[-1] = (classes, runs[-1][1] + segment.text)
        else:
            runs.append((classes, segment.text))
    return "".join(
        f'<span class="{" ".join(classes)}">{escape(text)}</span>' if classes else escape(text) for classes, text in runs
    )


def _style(style: Any, console: Console) -> Style | None:
    if not style:
        return None
    return console.get_style(style, default=Style()) if isinstance(style, str) else style


def _classes(style: Style | None) -> list[str]:
    """CSS classes for what a rich style means: its palette colour, bold, italic, dim."""
    if style is None:
        return []
    classes = []
    if style.color is not None:
        name = style.color.name.lower()
        if style.color.triplet is not None:
            name = style.color.triplet.hex.lower()
        meaning = _MEANING_BY_COLOR.get(name)
        if meaning:
            classes.append(f"lm-{meaning}")
    for attribute in ("bold", "italic", "underline", "dim"):
        if getattr(style, attribute):
            classes.append(f"lm-{attribute}")
    return classes


def _plain(renderable: Any) -> str:
    console = Console(file=_Discard(), width=PLAIN_WIDTH, record=True, force_terminal=False, force_jupyter=False)
    console.print(renderable)
    return console.export_text(clear=True, styles=False).rstrip("\n")
