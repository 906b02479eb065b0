"""A real JupyterLab server on a loopback port, and a headless Chromium (Playwright) driving it.

Used by tests/kernel/test_browser.py. The server runs on this interpreter (so its default python3 kernel
sees the same llm_magic, torch and transformers), with its own config, data, settings and
runtime folders under a temporary root, so neither the user's JupyterLab settings nor a
previous run change what the test sees. It serves a copy of the notebook: JupyterLab saves
what it runs, and the repository's notebooks stay without outputs.

Playwright is given Debian's chromium (`CHROMIUM`); it never downloads a browser.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip

# JupyterLab's settings for the test: no virtual scrolling of cells (every cell stays in the DOM
# with its real layout, so each one can be measured), no news or update checks (no network).
LAB_SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false", "checkForUpdates": False},
}

THEMES = {"light": "JupyterLab Light", "dark": "JupyterLab Dark"}


def chromium_path() -> str | None:
    return os.environ.get("LLM_MAGIC_CHROMIUM") or shutil.which("chromium") or (
        "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None
    )


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LabServer:
    def __init__(self, root: Path, port: int, token: str, process: subprocess.Popen, log: Path):
        self.root, self.port, self.token, self.process, self.log = root, port, token, process, log

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}?token={self.token}"

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]


@contextmanager
def lab_server(work: Path, notebooks: list[Path], env: dict[str, str], *, timeout: float = 120) -> Iterator[LabServer]:
    """JupyterLab serving copies of `notebooks` from `work/root`, with `env` for its kernels."""
    root = work / "root"
    root.mkdir(parents=True)
    for notebook in notebooks:
        shutil.copy(notebook, root / notebook.name)
    settings = work / "settings"
    for name, values in LAB_SETTINGS.items():
        path = settings / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    server_env = {
        **env,
        "JUPYTER_CONFIG_DIR": str(work / "config"),
        "JUPYTER_DATA_DIR": str(work / "data"),
        "JUPYTER_RUNTIME_DIR": str(work / "runtime"),
        "JUPYTERLAB_SETTINGS_DIR": str(settings),
        "JUPYTERLAB_WORKSPACES_DIR": str(work / "workspaces"),
        "JUPYTER_PLATFORM_DIRS": "1",
    }
    port, token = _free_port(), secrets.token_hex(16)
    log = work / "jupyterlab.log"
    command = [
        sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
        "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
        "--allow-root",  # CI runs as root
        # Nothing that would reach for the network: news, update checks, PyPI's extension index.
        "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        "--LabApp.extension_manager=readonly", "--ServerApp.terminals_enabled=False",
    ]  # fmt: skip
    with open(log, "wb") as out:
        process = subprocess.Popen(command, env=server_env, stdout=out, stderr=subprocess.STDOUT, cwd=root)
    server = LabServer(root, port, token, process, log)
    try:
        _wait_until_up(server, timeout)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_until_up(server: LabServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"JupyterLab exited with {server.process.returncode}:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(server.url("api/status"), timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"JupyterLab did not answer within {timeout:.0f} s:\n{server.log_tail()}")


@contextmanager
def browser(executable: str) -> Iterator:
    """A headless Chromium (a fresh temporary profile each time) under Playwright."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


PROBE = (Path(__file__).parent / "probe.js").read_text(encoding="utf-8")

# Every code cell has an execution count (no "[ ]:" waiting, no "[*]:" running) and the kernel is idle.
_ALL_RAN = """() => {
  const prompts = Array.from(document.querySelectorAll(".jp-Notebook .jp-CodeCell .jp-InputPrompt")).map((p) => p.innerText.trim());
  const status = document.querySelector(".jp-Notebook-ExecutionIndicator");
  return prompts.length > 0 && prompts.every((p) => /^\\[\\d+\\]:$/.test(p)) && (!status || status.dataset.status === "idle");
}"""


class LabPage:
    """One notebook open in JupyterLab, driven through its menus as a person would."""

    def __init__(self, page, server: LabServer):
        self.page, self.server = page, server

    def open(self, name: str, timeout_ms: int = 120_000) -> None:
        self.page.goto(self.server.url(f"lab/tree/{name}"))
        self.page.wait_for_selector(".jp-Notebook .jp-CodeCell", timeout=timeout_ms)
        # The kernel has started when the status bar says "<kernel name> | Idle".
        self.page.wait_for_function(
            "() => /\\|\\s*Idle\\b/.test((document.querySelector('#jp-main-statusbar') || {}).innerText || '')",
            timeout=timeout_ms,
        )

    def menu(self, *path: str) -> None:
        """Click through the menu bar: menu("Run", "Run All Cells")."""
        self.page.click(f".lm-MenuBar-itemLabel:text-is('{path[0]}')")
        for label in path[1:-1]:
            self.page.hover(f".lm-Menu-item:has(.lm-Menu-itemLabel:text-is('{label}'))")
        self.page.click(f".lm-Menu-item:has(.lm-Menu-itemLabel:text-is('{path[-1]}'))")

    def run_all(self, timeout_ms: int = 300_000) -> None:
        self.menu("Run", "Run All Cells")
        self.page.wait_for_function(_ALL_RAN, timeout=timeout_ms)

    def theme(self, name: str) -> None:
        self.menu("Settings", "Theme", THEMES[name])
        self.page.wait_for_function(f"() => document.body.dataset.jpThemeName === {json.dumps(THEMES[name])}")
        self.settle()

    def width(self, pixels: int, height: int = 900) -> None:
        self.page.set_viewport_size({"width": pixels, "height": height})
        self.settle()

    def settle(self) -> None:
        # Two animation frames: JupyterLab lays out on resize, then the browser paints.
        self.page.evaluate("() => new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done)))")
        self.page.wait_for_timeout(300)

    def probe(self) -> dict:
        return self.page.evaluate(PROBE)

    def hide_left_sidebar(self) -> None:
        self.menu("View", "Appearance", "Show Left Sidebar")
        self.settle()

    def screenshot(self, path: Path, width: int) -> Path:
        """The whole notebook: scrolled to the top, the window made as tall as the notebook, then back."""
        height = self.page.evaluate(
            "() => { const s = document.querySelector('.jp-NotebookPanel .jp-WindowedPanel-outer') || document.querySelector('.jp-Notebook');"
            " s.scrollTop = 0; return s.scrollHeight; }"
        )
        self.width(width, min(int(height) + 140, 14_000))
        self.page.screenshot(path=str(path))
        self.width(width)
        return path

    def screenshot_output(self, path: Path, source_prefix: str) -> Path:
        """One cell (input and output) whose source starts with `source_prefix`, at its real size."""
        cell = self.page.locator(".jp-Notebook .jp-CodeCell").filter(
            has=self.page.locator(".cm-content", has_text=source_prefix)
        ).first
        cell.scroll_into_view_if_needed()
        cell.screenshot(path=str(path))
        return path
