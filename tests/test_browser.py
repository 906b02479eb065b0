"""The executed quickstart, exported to HTML by nbconvert, as headless Chromium renders it.

What a reader sees is checked from the browser's own DOM and layout: a small script appended to a
copy of the page measures every `pre.llm-magic` table after layout (size, visibility, rendered
text, colours against their real background) and leaves the result in the DOM, which
`chromium --dump-dom` prints. A full-page screenshot goes to $LLM_MAGIC_ARTIFACTS/quickstart.png
for a person to look at.

Skipped without Chromium, unless LLM_MAGIC_REQUIRE_BROWSER=1 (CI), where that is a failure.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from support.demo import NOTEBOOKS

pytestmark = pytest.mark.browser

QUICKSTART = NOTEBOOKS / "quickstart.ipynb"
WIDTH = 1280  # a laptop browser window
MAX_HEIGHT = 16000  # screenshots taller than this are cut (Chromium's own limit is ~16k px)
ANSI = re.compile(r"\x1b\[|\[(?:\d{1,3};)*\d{1,3}m")
MIN_CONTRAST = 3.0  # WCAG's minimum for large/bold text; body text should reach 4.5

# Runs in the page after layout: everything the assertions need, as JSON on <body>.
PROBE = """
<script>
(function () {
  function effectiveBackground(el) {
    for (; el; el = el.parentElement) {
      const bg = getComputedStyle(el).backgroundColor;
      const m = bg.match(/rgba?\\(([^)]+)\\)/);
      if (m) {
        const parts = m[1].split(",").map(Number);
        if (parts.length < 4 || parts[3] > 0) return bg;
      }
    }
    return "rgb(255, 255, 255)";
  }
  function visible(el) {
    if (el.checkVisibility) return el.checkVisibility({checkOpacity: true, checkVisibilityCSS: true});
    const s = getComputedStyle(el);
    return s.display !== "none" && s.visibility !== "hidden" && Number(s.opacity) > 0;
  }
  const tables = Array.from(document.querySelectorAll("pre.llm-magic")).map(function (pre) {
    const rect = pre.getBoundingClientRect();
    const colours = {};
    pre.querySelectorAll("span").forEach(function (span) {
      const text = span.textContent.trim();
      if (!text) return;
      const s = getComputedStyle(span);
      const key = s.color + " on " + effectiveBackground(span) + " / opacity " + s.opacity;
      if (!(key in colours)) colours[key] = {color: s.color, background: effectiveBackground(span),
                                             opacity: Number(s.opacity), sample: text.slice(0, 60)};
    });
    const own = getComputedStyle(pre);
    return {
      width: rect.width, height: rect.height, visible: visible(pre),
      text: pre.innerText, scrollWidth: pre.scrollWidth, clientWidth: pre.clientWidth,
      color: own.color, background: effectiveBackground(pre), fontSize: own.fontSize,
      colours: Object.values(colours)
    };
  });
  const outputHeadings = Array.from(document.querySelectorAll(".jp-OutputArea-output pre"))
    .map(function (pre) { return pre.innerText.split("\\n")[0].trim(); });
  document.body.setAttribute("data-llm-magic-probe", JSON.stringify({
    tables: tables,
    outputHeadings: outputHeadings,
    pageText: document.body.innerText,
    pageHeight: document.documentElement.scrollHeight
  }));
})();
</script>
"""


def chromium_path() -> str | None:
    return os.environ.get("LLM_MAGIC_CHROMIUM") or shutil.which("chromium") or (
        "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None
    )


@pytest.fixture(scope="module")
def chromium() -> str:
    path = chromium_path()
    if path is None:
        message = "Chromium not found (apt-get install chromium, or set LLM_MAGIC_CHROMIUM)"
        if os.environ.get("LLM_MAGIC_REQUIRE_BROWSER") == "1":
            pytest.fail(message + "; LLM_MAGIC_REQUIRE_BROWSER=1")
        pytest.skip(message)
    return path


def run_chromium(chromium: str, url: str, profile: Path, *args: str) -> str:
    command = [
        chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}",
        # The export links require.js and MathJax from a CDN: fail those at once, offline or not.
        "--host-resolver-rules=MAP * ~NOTFOUND",
        *args, url,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"chromium exited {done.returncode}:\n{done.stderr[-3000:]}"
    return done.stdout


class _BodyProbe(HTMLParser):
    """Reads the probe's JSON from <body> and counts the llm_magic <pre> elements."""

    def __init__(self):
        super().__init__()
        self.probe: dict | None = None
        self.pre_count = 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "body" and "data-llm-magic-probe" in attrs:
            self.probe = json.loads(attrs["data-llm-magic-probe"])
        if tag == "pre" and "llm-magic" in (attrs.get("class") or "").split():
            self.pre_count += 1


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    folder = os.environ.get("LLM_MAGIC_ARTIFACTS")
    path = Path(folder) if folder else tmp_path_factory.mktemp("artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    from support.demo import build_demo_model, execute_notebook

    model = build_demo_model(tmp_path_factory.mktemp("browser-model"))
    return execute_notebook(QUICKSTART, model, allow_errors=True)


def probe_page(chromium: str, page: Path, work: Path) -> tuple[dict, int]:
    """(what the probe measured, number of pre.llm-magic in the DOM Chromium dumped)."""
    probed = work / f"{page.stem}.probe.html"
    probed.write_text(page.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    dom = run_chromium(chromium, probed.as_uri(), work / f"profile-{page.stem}", "--dump-dom")
    parser = _BodyProbe()
    parser.feed(dom)
    assert parser.probe is not None, "the probe script did not run (JavaScript error?)"
    return parser.probe, parser.pre_count


@pytest.fixture(scope="module")
def rendered(chromium, artifacts, quickstart, tmp_path_factory):
    """(probe data, number of pre.llm-magic in the dumped DOM, screenshot path, notebook), light theme."""
    from support.demo import export_html

    work = tmp_path_factory.mktemp("browser")
    page = export_html(quickstart, artifacts / "quickstart.html")
    probe, pre_count = probe_page(chromium, page, work)
    height = min(int(probe["pageHeight"]) + 40, MAX_HEIGHT)
    screenshot = artifacts / "quickstart.png"
    run_chromium(chromium, page.as_uri(), work / "profile-shot", f"--window-size={WIDTH},{height}",
                 f"--screenshot={screenshot}", "--hide-scrollbars")
    return probe, pre_count, screenshot, quickstart


@pytest.fixture(scope="module")
def rendered_dark(chromium, quickstart, tmp_path_factory):
    """The probe data of the same notebook exported with JupyterLab's dark theme."""
    from support.demo import export_html

    work = tmp_path_factory.mktemp("browser-dark")
    probe, _ = probe_page(chromium, export_html(quickstart, work / "quickstart-dark.html", theme="dark"), work)
    return probe


def expected_tables(nb) -> int:
    magic = re.compile(r"^\s*%%?(?:llmload|llmfree|gpustate)\b", re.MULTILINE)
    return sum(len(magic.findall(cell.source)) for cell in nb.cells if cell.cell_type == "code")


def test_every_magic_table_is_in_the_page(rendered):
    probe, pre_count, _, nb = rendered
    assert pre_count == len(probe["tables"]) == expected_tables(nb)


def test_each_table_is_shown_once(rendered):
    # A second renderer (rich's own Jupyter display) would add a copy of each table.
    probe, *_ = rendered
    headings = [table["text"].split("\n")[0].strip() for table in probe["tables"]]
    for heading in set(headings):
        shown = probe["outputHeadings"].count(heading)
        assert shown == headings.count(heading), f"{heading!r} is shown {shown} times in the outputs"


def test_tables_are_visible_with_real_size(rendered):
    probe, *_ = rendered
    for table in probe["tables"]:
        first = table["text"].splitlines()[0] if table["text"] else "(empty)"
        assert table["visible"], f"table {first!r} is hidden"
        assert table["width"] > 200 and table["height"] > 40, f"table {first!r} is {table['width']}x{table['height']} px"
        assert float(table["fontSize"].removesuffix("px")) >= 11, f"table {first!r} font is {table['fontSize']}"


def test_tables_fit_the_window_without_scrolling(rendered):
    probe, *_ = rendered
    for table in probe["tables"]:
        assert table["scrollWidth"] <= table["clientWidth"] + 1, (
            f"table {table['text'].splitlines()[0]!r} is cut off at {WIDTH} px: "
            f"{table['scrollWidth']} px of content in {table['clientWidth']} px"
        )


def test_tables_have_rows_and_device_names(rendered):
    probe, *_ = rendered
    texts = [table["text"] for table in probe["tables"]]
    load = next(text for text in texts if text.lstrip().startswith("%%llmload"))
    # The header row, then a row per released object, a row per device.
    assert re.search(r"object\s+type\s+memory", load)
    assert re.search(r"^\s*model\s+LlamaForCausalLM\s+.*freed", load, re.MULTILINE), load
    assert re.search(r"^\s*cpu\s+\d+\s+[\d.]+ [KMG]iB\s+100%", load, re.MULTILINE), load
    assert all("cpu" in text for text in texts if "gpustate" in text)
    for text in texts:
        assert len([line for line in text.splitlines() if line.strip()]) >= 3, f"table with no rows:\n{text}"


def test_no_terminal_colour_codes_in_visible_text(rendered):
    probe, *_ = rendered
    match = ANSI.search(probe["pageText"])
    assert match is None, f"raw colour code in the page: ...{probe['pageText'][max(0, match.start() - 80):match.end() + 40]!r}"


def _rgba(css: str) -> tuple[float, float, float, float]:
    values = [float(v) for v in re.findall(r"[\d.]+", css)]
    return (*values[:3], values[3] if len(values) > 3 else 1.0)


def _over(foreground: tuple, background: tuple) -> tuple[float, float, float]:
    """A translucent colour as it shows on an opaque background (alpha compositing)."""
    alpha = foreground[3]
    return tuple(alpha * f + (1 - alpha) * b for f, b in zip(foreground[:3], background[:3]))


def _luminance(rgb: tuple) -> float:
    def linear(c: float) -> float:
        c /= 255
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4

    red, green, blue = (linear(c) for c in rgb)
    return 0.2126 * red + 0.7152 * green + 0.0722 * blue


def contrast(foreground: str, background: str, opacity: float = 1.0) -> float:
    """WCAG contrast ratio of CSS colours, translucency (colour alpha, element opacity) applied."""
    back = _rgba(background)[:3]
    red, green, blue, alpha = _rgba(foreground)
    fore = _over((red, green, blue, alpha * opacity), back)
    lighter, darker = sorted((_luminance(fore), _luminance(back)), reverse=True)
    return (lighter + 0.05) / (darker + 0.05)


def test_contrast_arithmetic():
    assert contrast("rgb(0, 0, 0)", "rgb(255, 255, 255)") == pytest.approx(21.0)
    assert contrast("rgb(119, 119, 119)", "rgb(255, 255, 255)") == pytest.approx(4.48, abs=0.01)
    assert contrast("rgba(0, 0, 0, 0)", "rgb(255, 255, 255)") == pytest.approx(1.0)


def poorly_contrasted(probe: dict) -> list[str]:
    poor = []
    for table in probe["tables"]:
        plain = {"color": table["color"], "background": table["background"], "opacity": 1.0, "sample": "(uncoloured text)"}
        for colour in table["colours"] + [plain]:
            ratio = contrast(colour["color"], colour["background"], colour["opacity"])
            if ratio < MIN_CONTRAST:
                poor.append(f"{colour['sample']!r}: {colour['color']} on {colour['background']} = {ratio:.1f}:1")
    return sorted(set(poor))


def test_coloured_text_is_readable_on_its_background(rendered):
    probe, *_ = rendered
    poor = poorly_contrasted(probe)
    assert not poor, f"text below {MIN_CONTRAST}:1 contrast:\n" + "\n".join(poor)


def test_coloured_text_is_readable_in_the_dark_theme(rendered_dark):
    # JupyterLab's dark theme: inline colours chosen for white paper can vanish on #111.
    poor = poorly_contrasted(rendered_dark)
    assert not poor, f"text below {MIN_CONTRAST}:1 contrast on the dark theme:\n" + "\n".join(poor)


def test_screenshot_was_written(rendered):
    *_, screenshot, _ = rendered
    data = screenshot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    # PNG header: width and height, big-endian, at bytes 16-24.
    width = int.from_bytes(data[16:20], "big")
    assert width == WIDTH


def test_tables_are_rendered_not_shown_as_markup(rendered):
    # nbconvert must not have escaped the tables' HTML into visible markup.
    probe, *_ = rendered
    assert "<span" not in probe["pageText"] and html.escape("<pre") not in probe["pageText"]
