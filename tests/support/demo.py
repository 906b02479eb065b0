"""Run the notebooks on a small local model and show what the magics printed.

    python tests/support/demo.py [--out DIR] [--model PATH]     (what `bash .ci/demo` runs)

Builds a small random model once (no download; kept in DEMO_MODEL_CACHE and reused), executes
each notebook of DEMO_NOTEBOOKS in a real ipykernel started from this interpreter, prints the
text of every cell's output, and writes each executed notebook and an HTML export to DIR. The
notebooks ship in the repository, not in the wheel: run this from a clone.

The functions are reused by the tests (tests/kernel/test_notebooks.py, tests/kernel/test_browser.py).
"""

from __future__ import annotations

import argparse
import html
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

if __package__ in (None, ""):  # run as a script: make `support` (tests/support) importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# The notebook's first cell reads this; without it, the notebook builds its own model.
MODEL_ENV = "LLM_MAGIC_DEMO_MODEL"
DEFAULT_OUT = "llm_magic_demo_output"  # under the clone's root; .gitignore lists it
NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
DEMO_NOTEBOOKS = ("quickstart.ipynb", "oom_rescue_and_watch.ipynb")
# Where the demo model is built once and reused (the notebooks, run by hand, use the same
# folder): one 14 MB model on the machine, however often the demo runs. Delete it to remove it.
DEMO_MODEL_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llm_magic" / "demo-model"
_BUILT_MARKER = "llm-magic-demo.json"  # written last: a folder without it is an interrupted build

# Big enough (about 13 MiB of float32) to stand out above the 1 MiB "small holder" threshold of
# the reports; small enough to load in well under a second on two CPU cores.
DEMO_MODEL_SIZES = dict(hidden_size=256, intermediate_size=512, vocab_size=2048, num_hidden_layers=4)

# A kernel with no network: everything the notebooks load is local. Nothing here changes what
# the notebook shows: transformers' loading bars and any warning appear as they would for a user
# (the test extra installs ipywidgets, as a JupyterLab user of transformers has, so tqdm draws
# its bars and does not warn "IProgress not found").
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def notebook_path(name: str = "quickstart.ipynb") -> Path:
    path = NOTEBOOKS / name
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: the notebooks ship with the repository, not the package. "
            "Run `bash .ci/demo` from a clone."
        )
    return path


def build_demo_model(path: str | Path | None = None) -> Path:
    """The demo checkpoint (config, random weights, tokenizer) at `path`, built unless it is
    already there. Default: DEMO_MODEL_CACHE, so repeated demos leave no copies behind."""
    import json

    from support.tinymodels import build_tiny_model

    path = Path(path) if path is not None else DEMO_MODEL_CACHE
    marker = path / _BUILT_MARKER
    if marker.is_file() and json.loads(marker.read_text()) == DEMO_MODEL_SIZES:
        return path
    build_tiny_model(path, "llama", **DEMO_MODEL_SIZES)
    marker.write_text(json.dumps(DEMO_MODEL_SIZES))
    return path


def kernel_env(model_path: str | Path | None) -> dict[str, str]:
    env = {**os.environ, **OFFLINE_ENV}
    # The test suite's own quiet settings (tests/conftest.py) are not the user's: drop them.
    env.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
    if model_path is not None:
        env[MODEL_ENV] = str(model_path)
    return env


def _kernel_manager(spec_root: Path):
    """A kernel manager for an ipykernel running on *this* interpreter.

    The "python3" kernelspec found on the machine may belong to another environment; a spec
    written here pins sys.executable, so the notebook sees the same llm_magic, torch and
    transformers as the caller.
    """
    from ipykernel.kernelspec import write_kernel_spec
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    write_kernel_spec(spec_root / "llm-magic-python", overrides={"display_name": "llm_magic (this Python)"})
    specs = KernelSpecManager(kernel_dirs=[str(spec_root)], ensure_native_kernel=False)
    manager = KernelManager(kernel_name="llm-magic-python", kernel_spec_manager=specs)
    if _curve_available(manager):
        # Encrypts the local zmq sockets (and silences ipykernel's plain-TCP warning).
        manager.transport_encryption = "auto"
    return manager


def _curve_available(manager) -> bool:
    import zmq

    # jupyter_client < 8.10 has no transport_encryption; pyzmq without libsodium has no curve.
    return manager.has_trait("transport_encryption") and bool(zmq.has("curve"))


def execute_notebook(
    path: str | Path,
    model_path: str | Path | None,
    *,
    allow_errors: bool = False,
    timeout: int = 300,
    cwd: str | Path | None = None,
):
    """Execute the notebook at `path` in a fresh ipykernel; return the executed notebook node.

    Cells tagged `raises-exception` may fail (the quickstart fails one on purpose); any other
    error stops the run with nbclient's CellExecutionError, unless `allow_errors` (tests use it
    to run every cell and then say which ones failed).
    """
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(str(path), as_version=4)
    with tempfile.TemporaryDirectory(prefix="llm-magic-kernel-") as spec_root:
        client = NotebookClient(
            nb,
            km=_kernel_manager(Path(spec_root)),
            timeout=timeout,
            allow_errors=allow_errors,
            resources={"metadata": {"path": str(cwd or Path(path).parent)}},
        )
        # nbclient leaves a kernel it did not create running: ask it to shut this one down.
        client.execute(env=kernel_env(model_path), cleanup_kc=True)
    return nb


def export_html(nb, path: str | Path, *, theme: str = "light") -> Path:
    """Write `nb` as a standalone HTML page (nbconvert's lab template; theme "light" or "dark")."""
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter(theme=theme).from_notebook_node(nb)
    path = Path(path)
    path.write_text(body, encoding="utf-8")
    return path


def write_notebook(nb, path: str | Path) -> Path:
    import nbformat

    path = Path(path)
    nbformat.write(nb, str(path))
    return path


WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def output_texts(output: Any, widgets: dict | None = None) -> Iterator[str]:
    """The plain text of one cell output, as a terminal would show it. `widgets`: the notebook's
    saved widget state, for progress bars (see widget_text)."""
    kind = output.get("output_type")
    if kind == "stream":
        yield output.get("text", "")
    elif kind in ("display_data", "execute_result"):
        data = output.get("data", {})
        text = widget_text(data[WIDGET_VIEW], widgets or {}) if WIDGET_VIEW in data else None
        text = text or data.get("text/plain")
        if text:
            yield text if text.endswith("\n") else text + "\n"
    elif kind == "error":
        # The traceback is full of colour codes; its last line says what happened.
        yield f"{output.get('ename')}: {output.get('evalue')}\n"


def widget_text(view: dict, widgets: dict) -> str | None:
    """A progress bar (tqdm's widget: label, bar, figures) as the text it shows when done.

    The output's own text/plain is the bar as first displayed (0%); JupyterLab shows the final
    state, which nbclient saves in the notebook's widget state. None for any other widget.
    """
    model = widgets.get(view.get("model_id"), {})
    parts = []
    for child in model.get("state", {}).get("children", []):
        widget = widgets.get(str(child).removeprefix("IPY_MODEL_"), {})
        state = widget.get("state", {})
        if widget.get("model_name") == "FloatProgressModel" and state.get("max"):
            filled = round(10 * state.get("value", 0) / state["max"])
            parts.append("|" + "█" * filled + " " * (10 - filled) + "|")
        elif widget.get("model_name") == "HTMLModel":
            parts.append(html.unescape(str(state.get("value", ""))).replace("\u2007", " "))
    return "".join(parts).strip() or None


def format_transcript(nb) -> str:
    """Every code cell with its outputs, as plain text."""
    widgets = nb.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {}).get("state", {})
    lines: list[str] = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        number = cell.get("execution_count") or " "
        source = cell.source.rstrip().replace("\n", "\n" + " " * (len(f"In [{number}]: ")))
        lines.append(f"In [{number}]: {source}\n")
        for output in cell.get("outputs", []):
            lines.extend(output_texts(output, widgets))
        lines.append("\n")
    return "".join(lines)


def run_demo(out_dir: str | Path, model_path: str | Path | None = None, notebooks=DEMO_NOTEBOOKS) -> list[tuple[Path, Path]]:
    """Run each notebook on the demo model (built once unless given) and print it; return
    [(executed notebook, html export)]."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sources = [notebook_path(name) for name in notebooks]
    if model_path is None:
        print(f"Demo model: {DEMO_MODEL_CACHE} (a small random Llama, built once, no download)", flush=True)
        model_path = build_demo_model()
    written = []
    for source in sources:
        print(f"\n=== {source.relative_to(NOTEBOOKS.parent)}: running in a fresh kernel...\n", flush=True)
        nb = execute_notebook(source, model_path)
        print(format_transcript(nb))
        written.append((write_notebook(nb, out_dir / source.name), export_html(nb, out_dir / f"{source.stem}.html")))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tests/support/demo.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"where to write the executed notebooks and HTML (default: ./{DEFAULT_OUT})")
    parser.add_argument("--model", default=None, help="a local checkpoint to use instead of building the demo model")
    args = parser.parse_args(argv)
    os.environ.update(OFFLINE_ENV)  # before transformers is imported: quiet and offline
    try:
        written = run_demo(args.out, args.model)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for notebook, page in written:
        print(f"Executed notebook: {notebook.resolve()}")
        print(f"HTML export:       {page.resolve()}  (open it in a browser)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
