"""No wasted collections: automatic gc is paused while the magics walk the heap (and back on
after, Ctrl-C included, unless the user had turned it off); a release runs at most one full
collection, none when reference counting already freed every target; the C heap is trimmed
only when cpu memory was freed."""

from __future__ import annotations

import gc
import weakref

import pytest
from cells import LOAD, ok

from llm_magic.engine import release as release_module
from llm_magic.engine import walk as walk_module


@pytest.fixture
def collections():
    """Every collection gc runs, as (generation, automatic?) — automatic ones start while our
    own gc.collect() is not running."""
    seen: list[int] = []

    def record(phase, info):
        if phase == "start":
            seen.append(info["generation"])

    gc.callbacks.append(record)
    yield seen
    gc.callbacks.remove(record)


@pytest.fixture
def busy_namespace(shell):
    """Enough objects that a walk allocating paths and queue entries trips gc's thresholds."""
    ok(shell, "import torch\nrecords = [{'id': i, 'tags': [str(i)]} for i in range(15_000)]\nweights = torch.zeros(1000)")
    return shell


def test_walks_run_no_automatic_collection(busy_namespace, collections):
    from llm_magic.commands.gpustate import take_snapshot
    from llm_magic.commands.llmfree import run_llmfree
    from llm_magic.commands.llmload import kept_holders
    from llm_magic.ipython import shell_state

    shell = busy_namespace
    assert gc.isenabled()
    for walk in (
        lambda: take_snapshot(shell_state.visible_names(shell), shell_state.hidden_refs(shell)),
        lambda: kept_holders(shell, []),
        lambda: run_llmfree(shell, [], everything=True, dry_run=True),
    ):
        collections.clear()
        walk()
        # Allocations made while gc is paused still count: one young collection may follow
        # the walk, never one per few hundred objects visited, nor a full one.
        assert len(collections) <= 1 and 2 not in collections, collections
        assert gc.isenabled()


def test_ctrl_c_inside_a_walk_turns_gc_back_on(busy_namespace, monkeypatch):
    from llm_magic.commands.gpustate import take_snapshot
    from llm_magic.ipython import shell_state

    calls = []
    real = walk_module.expand

    def interrupted(*args):
        calls.append(gc.isenabled())
        if len(calls) == 50:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(walk_module, "expand", interrupted)
    for user_had_gc_on in (True, False):
        calls.clear()
        (gc.enable if user_had_gc_on else gc.disable)()
        try:
            with pytest.raises(KeyboardInterrupt):
                take_snapshot(shell_state.visible_names(busy_namespace), shell_state.hidden_refs(busy_namespace))
            assert calls and not any(calls)  # paused during the walk
            assert gc.isenabled() == user_had_gc_on  # and as the user had it after
        finally:
            gc.enable()


def test_release_freed_by_refcount_runs_no_collection(shell, tiny_model, collections, monkeypatch):
    trims = []
    monkeypatch.setattr(release_module, "_trim_c_heap", lambda: trims.append(1))
    shell.user_ns["_test_path"] = tiny_model
    ok(shell, f"%%llmload $_test_path\n{LOAD}")
    old = weakref.ref(shell.user_ns["model"])
    collections.clear()
    result = ok(shell, "%llmfree model -o")
    assert result.released[0].freed and old() is None
    assert 2 not in collections  # no full collection: reference counting freed it
    assert trims == [1]  # cpu memory was freed: the C heap is trimmed, once


def test_release_of_a_cycle_runs_one_collection(shell, collections, monkeypatch):
    trims = []
    monkeypatch.setattr(release_module, "_trim_c_heap", lambda: trims.append(1))
    ok(
        shell,
        "import torch, weakref\n"
        "class Node:\n"
        "    pass\n"
        "node = Node()\n"
        "node.me = node\n"
        "node.weights = torch.zeros(1000)\n"
        "probe = weakref.ref(node)\n",
    )
    collections.clear()
    result = ok(shell, "%llmfree node -o")
    assert result.released[0].freed and shell.user_ns["probe"]() is None
    assert collections.count(2) == 1
    assert trims == [1]


def test_nothing_freed_on_cpu_means_no_trim(shell, monkeypatch):
    trims = []
    monkeypatch.setattr(release_module, "_trim_c_heap", lambda: trims.append(1))
    ok(shell, "import torch\nwith torch.device('meta'):\n    ghost = torch.nn.Linear(100, 100)\nkept = torch.zeros(10)\nalias = kept")
    result = ok(shell, "%llmfree ghost kept -o")
    assert result.freed_bytes == {}  # meta holds no memory; `kept` is still named by `alias`
    assert trims == []
