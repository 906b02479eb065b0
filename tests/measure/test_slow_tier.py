"""The slow-tier warning and the highlighted rows of the load report follow one machine-level answer.

A model wholly on cpu next to an idle GPU is the silent-offload case: the warning (which asks the
machine) fired, but the row was not highlighted (the table asked the model). CI has no GPU, so
the answer is passed as data, the way the load report carries it (`MemorySnapshot.accelerator_present`).
"""

from __future__ import annotations

import pytest
from rich.table import Table

from llm_magic.commands.llmload import _warnings
from llm_magic.commands.load_report import LoadReport
from llm_magic.engine.release import ReleaseResult
from llm_magic.measure.memory import (
    DeviceMemory,
    MemorySnapshot,
    accelerator_present,
    memory_snapshot,
)
from llm_magic.measure.placement import model_placement
from llm_magic.render.core import WARN
from llm_magic.render.load import placement_table, render_load_report


@pytest.fixture(scope="module")
def cpu_placement(tiny_models):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models())
    return model_placement(model, "model")


def highlighted(table: Table) -> list[bool]:
    return [row.style == WARN for row in table.rows]


def snapshot(accelerator: bool) -> MemorySnapshot:
    cpu = DeviceMemory("cpu", "RAM", 64 << 30, 32 << 30)
    return MemorySnapshot((cpu,), "unavailable", 0, "not queried", accelerator_present=accelerator)


@pytest.mark.parametrize("accelerator", [True, False])
def test_row_highlight_follows_the_machine_like_the_warning(cpu_placement, accelerator):
    warnings = _warnings(ReleaseResult(), [cpu_placement], accelerator)
    table = placement_table(cpu_placement, accelerator_present=accelerator)
    assert [row.device for row in cpu_placement.rows] == ["cpu"]
    assert highlighted(table) == [accelerator]
    assert bool(warnings) is accelerator
    if accelerator:
        assert "cpu" in warnings[0] and "accelerator" in warnings[0]


@pytest.mark.parametrize("accelerator", [True, False])
def test_load_report_renders_the_flag_it_carries(cpu_placement, accelerator):
    report = LoadReport("m", models=(cpu_placement,), memory_after=snapshot(accelerator),
                        warnings=tuple(_warnings(ReleaseResult(), [cpu_placement], accelerator)))
    tables = [part for part in render_load_report(report).renderables if isinstance(part, Table)]
    [placement] = [t for t in tables if str(t.title).startswith("model:")]
    assert highlighted(placement) == [accelerator]
    assert report.to_dict()["memory_after"]["accelerator_present"] is accelerator


def test_the_snapshot_asks_the_machine():
    import torch

    assert memory_snapshot().accelerator_present is accelerator_present(torch) is torch.cuda.is_available()
