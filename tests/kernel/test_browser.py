"""The quickstart notebook run in a real JupyterLab, in headless Chromium, as a person would.

A JupyterLab server starts on a loopback port with a token (tests/support/lab.py); Chromium,
driven by Playwright, opens notebooks/quickstart.ipynb (a copy), runs every cell through the Run
menu and waits for the kernel to be idle. Everything below is asserted from the live DOM and its
layout (tests/support/probe.js), in JupyterLab's light and dark themes, at 1,280 and 800 px.
Screenshots of both themes go to $LLM_MAGIC_ARTIFACTS (CI keeps them).

Skipped without Chromium, unless LLM_MAGIC_REQUIRE_BROWSER=1 (CI), where that is a failure.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from support.demo import NOTEBOOKS

pytestmark = pytest.mark.browser

QUICKSTART = NOTEBOOKS / "quickstart.ipynb"
WIDTHS = (1280, 800)  # a laptop browser window; a half-screen one
THEMES = ("light", "dark")
MIN_CONTRAST = 4.5  # WCAG AA for body text
ANSI = re.compile(r"\x1b\[|\[(?:\d{1,3};)*\d{1,3}m")
MAGIC = re.compile(r"^\s*%%?(?:llmload|llmfree|gpustate)\b", re.MULTILINE)
NUMERIC_COLUMNS = {
    "memory", "bytes", "modules", "share", "predicted", "before", "after", "change (system-wide)",
    "total", "free", "this process", "others", "size",
}  # fmt: skip


@pytest.fixture(scope="module")
def chromium() -> str:
    from support.lab import chromium_path

    path = chromium_path()
    if path is None:
        message = "Chromium not found (apt-get install chromium, or set LLM_MAGIC_CHROMIUM)"
        if os.environ.get("LLM_MAGIC_REQUIRE_BROWSER") == "1":
            pytest.fail(message + "; LLM_MAGIC_REQUIRE_BROWSER=1")
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    folder = os.environ.get("LLM_MAGIC_ARTIFACTS")
    path = Path(folder) if folder else tmp_path_factory.mktemp("artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def lab(chromium, artifacts, tmp_path_factory):
    """Run the quickstart in JupyterLab once; probe it per (theme, width); take screenshots.

    -> {"probes": {(theme, width): probe}, "screenshots": {theme: path}}
    """
    from support.demo import build_demo_model, kernel_env
    from support.lab import LabPage, browser, lab_server

    work = tmp_path_factory.mktemp("lab")
    model = build_demo_model(work / "model")
    probes, screenshots = {}, {}
    with lab_server(work / "server", [QUICKSTART], kernel_env(model)) as server, browser(chromium) as chrome:
        lab_page = LabPage(chrome.new_page(viewport={"width": WIDTHS[0], "height": 900}), server)
        try:
            lab_page.open(QUICKSTART.name)
            lab_page.hide_left_sidebar()
            lab_page.run_all()
            for theme in THEMES:
                lab_page.theme(theme)
                for width in WIDTHS:
                    lab_page.width(width)
                    probes[theme, width] = lab_page.probe()
                screenshots[theme] = lab_page.screenshot(artifacts / f"quickstart-{theme}.png", WIDTHS[0])
                for name, prefix in (("llmload", "%%llmload"), ("gpustate", "%gpustate")):
                    lab_page.screenshot_output(artifacts / f"quickstart-{theme}-{name}.png", prefix)
        except Exception:
            lab_page.page.screenshot(path=str(artifacts / "quickstart-failure.png"))
            print(server.log_tail())
            raise
    return {"probes": probes, "screenshots": screenshots}


@pytest.fixture(scope="module")
def light(lab) -> dict:
    return lab["probes"]["light", WIDTHS[0]]


def reports(probe: dict) -> list[dict]:
    return [report for cell in probe["cells"] for report in cell["reports"]]


def report_after(probe: dict, prefix: str, occurrence: int = 0) -> dict:
    cells = [cell for cell in probe["cells"] if cell["source"].lstrip().startswith(prefix)]
    assert len(cells) > occurrence, f"no cell #{occurrence} starting with {prefix!r}"
    (report,) = cells[occurrence]["reports"]
    return report


def table(report: dict, caption_prefix: str) -> dict:
    found = [t for t in report["tables"] if (t["caption"] or "").startswith(caption_prefix)]
    assert found, f"no table titled {caption_prefix!r} in:\n{report['text']}"
    return found[0]


def texts(row: list[dict]) -> list[str]:
    return [cell["text"] for cell in row]


# --- the notebook ran, in the page users work in ------------------------------------------------


def test_every_cell_ran_in_the_live_kernel(light):
    prompts = [cell["prompt"] for cell in light["cells"]]
    assert prompts and all(re.fullmatch(r"\[\d+\]:", p) for p in prompts), prompts
    assert "old model freed: True" in light["pageText"] and "model freed: True" in light["pageText"]


def test_each_magic_shows_one_report(light):
    # One per magic line: a second renderer (rich's own Jupyter display) would add a copy.
    for cell in light["cells"]:
        assert len(cell["reports"]) == len(MAGIC.findall(cell["source"])), cell["source"]
    assert len(reports(light)) == 5


# --- real tables --------------------------------------------------------------------------------


def test_reports_are_html_tables_with_header_cells(light):
    for report in reports(light):
        assert report["tables"], f"a report with no <table>:\n{report['text']}"
        assert report["preCount"] == 0, "a report fell back to preformatted text"
        for t in report["tables"]:
            assert t["headers"] and all(h["tag"] == "th" for h in t["headers"]), t
            assert t["rows"], f"table {t['caption']!r} has no rows"


def test_load_report_rows_name_the_right_devices_and_objects(light):
    report = report_after(light, "%%llmload")
    released = table(report, "Released")
    assert texts(released["headers"])[:3] == ["object", "type", "memory"]
    (row,) = released["rows"]
    assert texts(row)[:2] == ["model", "LlamaForCausalLM"] and texts(row)[-1].startswith("freed")
    placement = table(report, "model: LlamaForCausalLM")
    (device_row,) = placement["rows"]
    assert device_row[0]["text"] == "cpu" and re.fullmatch(r"\d+", device_row[1]["text"])
    assert re.fullmatch(r"[\d.]+ [KMG]iB", device_row[2]["text"]) and device_row[3]["text"] == "100%"
    assert [texts(r)[0] for r in table(report, "Free memory")["rows"]] == ["cpu"]


def test_gpustate_tables_have_a_row_per_device_and_holder(light):
    before = report_after(light, "%gpustate", 0)
    assert [texts(r)[0] for r in table(before, "Memory")["rows"]] == ["cpu"]
    holders = table(before, "Holders")
    (row,) = holders["rows"]
    assert row[0]["text"] == "model" and "Out[" in row[-1]["text"] and "traceback" in row[-1]["text"]
    after = report_after(light, "%gpustate", 1)
    (row,) = table(after, "Holders")["rows"]
    assert "Out[" not in " ".join(texts(row)) and "traceback" not in " ".join(texts(row))


def test_numbers_are_right_aligned_and_text_left_aligned(light):
    checked = 0
    for report in reports(light):
        for t in report["tables"]:
            for index, header in enumerate(t["headers"]):
                want = "right" if header["text"] in NUMERIC_COLUMNS else "left"
                assert header["align"] == want, f"header {header['text']!r} is {header['align']}"
                for row in t["rows"]:
                    assert row[index]["align"] == want, f"{header['text']!r} cell {row[index]['text']!r} is {row[index]['align']}"
                    checked += 1
    assert checked > 20


def test_tables_are_visible_with_real_size(light):
    for report in reports(light):
        first = report["text"].splitlines()[0] if report["text"] else "(empty)"
        assert report["visible"], f"report {first!r} is hidden"
        assert report["width"] > 200 and report["height"] > 40, f"report {first!r} is {report['width']}x{report['height']} px"
        assert report["fontSize"] >= 12, f"report {first!r} font is {report['fontSize']} px"


def test_tables_are_rendered_not_shown_as_markup(light):
    assert "<span" not in light["pageText"] and "<table" not in light["pageText"] and "<div" not in light["pageText"]


# --- fits the page, in both themes, at both widths ----------------------------------------------


@pytest.mark.parametrize("theme", THEMES)
@pytest.mark.parametrize("width", WIDTHS)
def test_nothing_overflows_the_cell(lab, theme, width):
    probe = lab["probes"][theme, width]
    assert probe["viewport"] == width
    for report in reports(probe):
        first = report["text"].splitlines()[0]
        assert report["scrollWidth"] <= report["clientWidth"] + 1, f"{first!r} scrolls at {width} px"
        assert report["areaScrollWidth"] <= report["areaClientWidth"] + 1, f"{first!r}'s output area scrolls at {width} px"
        assert not report["overflowing"], f"{first!r} at {width} px:\n" + "\n".join(report["overflowing"][:5])


def test_tables_reflow_with_the_page(lab):
    # Narrower window, same content, no overflow: the wide table wraps its text cells instead.
    wide = report_after(lab["probes"]["light", 1280], "%gpustate", 0)
    narrow = report_after(lab["probes"]["light", 800], "%gpustate", 0)
    assert narrow["width"] < wide["width"] and narrow["height"] >= wide["height"]


def test_contrast_arithmetic():
    assert contrast([0, 0, 0, 1], [255, 255, 255]) == pytest.approx(21.0)
    assert contrast([119, 119, 119, 1], [255, 255, 255]) == pytest.approx(4.48, abs=0.01)
    assert contrast([0, 0, 0, 0], [255, 255, 255]) == pytest.approx(1.0)
    assert contrast([0, 0, 0, 1], [255, 255, 255], opacity=0.5) == pytest.approx(3.98, abs=0.01)


@pytest.mark.parametrize("theme", THEMES)
def test_text_is_readable_in_light_and_dark_themes(lab, theme):
    probe = lab["probes"][theme, WIDTHS[0]]
    assert probe["themeLight"] == ("true" if theme == "light" else "false"), probe["theme"]
    poor, seen = [], set()
    for report in reports(probe):
        for colour in report["colours"]:
            seen.add(str(colour["color"]))
            ratio = contrast(colour["color"], colour["background"], colour["opacity"])
            if ratio < MIN_CONTRAST:
                poor.append(f"{colour['sample']!r}: {colour['color']} on {colour['background']} = {ratio:.2f}:1")
    assert len(seen) >= 4, f"only {len(seen)} text colours measured: {seen}"  # text, dim, heading, ok at least
    assert not poor, f"text below {MIN_CONTRAST}:1 on the {theme} theme:\n" + "\n".join(sorted(set(poor)))


def test_warning_is_a_styled_block_not_text(lab):
    # The quickstart loads without a warning; the warning's own rendering is checked in
    # tests/render/test_render_html.py. Here: no report shows a terminal box drawn with characters.
    for report in reports(lab["probes"]["light", WIDTHS[0]]):
        assert not re.search(r"[┏┃┗━─]", report["text"]), report["text"]


# --- what a JupyterLab user sees besides the tables ---------------------------------------------


@pytest.mark.parametrize("theme", THEMES)
def test_no_colour_codes_and_no_progress_warning(lab, theme):
    text = lab["probes"][theme, WIDTHS[0]]["pageText"]
    match = ANSI.search(text)
    assert match is None, f"raw colour code in the page: ...{text[max(0, match.start() - 80):match.end() + 40]!r}"
    assert "IProgress not found" not in text


@pytest.mark.parametrize("theme", THEMES)
def test_screenshots_were_written(lab, theme):
    data = lab["screenshots"][theme].read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width == WIDTHS[0] and height > 1500  # the whole notebook, not one window of it


# --- contrast, as WCAG defines it ---------------------------------------------------------------


def _luminance(rgb) -> float:
    def linear(c: float) -> float:
        c /= 255
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4

    red, green, blue = (linear(c) for c in rgb)
    return 0.2126 * red + 0.7152 * green + 0.0722 * blue


def contrast(foreground, background, opacity: float = 1.0) -> float:
    """WCAG contrast of an [r, g, b, alpha] colour (element opacity applied) on an opaque [r, g, b]."""
    alpha = foreground[3] * opacity
    shown = [alpha * f + (1 - alpha) * b for f, b in zip(foreground[:3], background[:3])]
    lighter, darker = sorted((_luminance(shown), _luminance(background)), reverse=True)
    return (lighter + 0.05) / (darker + 0.05)
