"""Shared fixtures: offline tiny checkpoints, and a fresh real InteractiveShell per test."""

from __future__ import annotations

import atexit
import gc
import os
import sys

# Before transformers is imported anywhere: no hub, no network, no telemetry.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if _cuda_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """`tiny_models(arch="llama", **options)` -> path of a cached tiny checkpoint."""
    from support.tinymodels import build_tiny_model

    cache: dict[tuple, str] = {}
    root = tmp_path_factory.mktemp("tiny-models")

    def make(arch: str = "llama", **options) -> str:
        key = (arch, tuple(sorted(options.items())))
        if key not in cache:
            cache[key] = str(build_tiny_model(root / f"m{len(cache)}-{arch}", arch, **options))
        return cache[key]

    return make


@pytest.fixture
def tiny_model(tiny_models) -> str:
    """Path of the default tiny Llama checkpoint (float32, safetensors, with tokenizer)."""
    return tiny_models()


@pytest.fixture
def shell():
    """A fresh, real InteractiveShell with llm_magic loaded; torn down after the test.

    InteractiveShell is a singleton: clear the instance first so each test gets its own
    namespaces, output history and exception state.
    """
    from IPython.core.interactiveshell import InteractiveShell

    InteractiveShell.clear_instance()
    for name in ("last_type", "last_value", "last_traceback", "last_exc"):
        if hasattr(sys, name):
            delattr(sys, name)
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "llm_magic")
    yield ip
    if "llm_magic" in ip.extension_manager.loaded:
        ip.run_line_magic("unload_ext", "llm_magic")
    # The old shell may outlive the test (IPython keeps a few module-level references); drop
    # what would keep this test's models alive into the next test's gc scans.
    from llm_magic.ipython.shell_state import clear_exception_state

    clear_exception_state(ip)
    ip.reset(new_session=False)
    # IPython runs atexit_operations for every shell it made: one more reset each, and with it a
    # gc.collect() over the whole torch heap (about 2 minutes at the suite's exit on 2 cores).
    # This shell is reset already: end its history session now and drop that exit hook.
    atexit.unregister(ip.atexit_operations)
    ip.history_manager.end_session()
    InteractiveShell.clear_instance()
    gc.collect()


@pytest.fixture(scope="module")
def frozen_imports():
    """Move what exists before a module's tests (torch, transformers, IPython: a few hundred
    thousand objects) to gc's permanent generation, so the many full collections (the engine's
    own, the shell's reset) scan only what the tests create. Nothing a test creates is frozen, so
    every weak-reference proof is unchanged; the freeze is undone after the module."""
    import torch  # noqa: F401
    import transformers  # noqa: F401

    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()
