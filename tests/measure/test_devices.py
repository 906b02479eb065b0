"""Memory per device, and the budget of a `device_map="auto"` load, against the real libraries."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types

import pytest

from llm_magic.compat.transformers import major as transformers_major
from llm_magic.measure.memory import (
    CUDA_MEASURED,
    CUDA_NO_TORCH,
    CUDA_NOT_INITIALISED,
    CUDA_UNAVAILABLE,
    DeviceMemory,
    MemorySnapshot,
    _with_gpu_processes,
    memory_snapshot,
)
from llm_magic.predict.budget import (
    autoload_budget,
    free_after_release,
    loader_budget,
    loader_max_memory,
)

MiB = 2**20
GiB = 2**30


def run_fresh(code: str) -> dict:
    """Run `code` in a new interpreter; it prints one JSON object as its last line."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_cpu_row_is_sane():
    cpu = memory_snapshot().device("cpu")
    assert cpu.total_bytes >= cpu.free_bytes > 0
    assert cpu.rss_bytes > 0
    assert cpu.allocated_bytes is None and cpu.processes is None


def test_rss_grows_with_a_64_mib_tensor():
    import torch

    before = memory_snapshot().device("cpu").rss_bytes
    tensor = torch.ones(64 * MiB // 4)  # written, so its pages are resident (torch.empty's are not)
    after = memory_snapshot().device("cpu").rss_bytes
    assert after - before >= 48 * MiB
    del tensor


def test_snapshot_without_torch_does_not_import_it():
    data = run_fresh(
        """
        import json, sys
        import llm_magic.measure.memory, llm_magic.measure.placement
        snapshot = llm_magic.measure.memory.memory_snapshot()
        print(json.dumps({"torch": "torch" in sys.modules, "snapshot": snapshot.to_dict()}))
        """
    )
    assert data["torch"] is False
    assert data["snapshot"]["cuda_state"] == CUDA_NO_TORCH
    assert data["snapshot"]["cuda_device_count"] is None
    assert [d["device"] for d in data["snapshot"]["devices"]] == ["cpu"]


def test_snapshot_does_not_initialise_cuda():
    data = run_fresh(
        """
        import json
        import torch
        from llm_magic.measure.memory import memory_snapshot
        from llm_magic.predict.budget import autoload_budget
        snapshot = memory_snapshot()
        budget = autoload_budget(snapshot)
        print(json.dumps({
            "initialised": torch.cuda.is_initialized(),
            "snapshot": snapshot.to_dict(),
            "budget": {str(k): v for k, v in budget.items()},
            "count": torch.cuda.device_count(),
        }))
        """
    )
    assert data["initialised"] is False
    snapshot = data["snapshot"]
    assert [d["device"] for d in snapshot["devices"]] == ["cpu"]
    assert snapshot["cuda_device_count"] == data["count"]
    if data["count"]:
        assert snapshot["cuda_state"] == CUDA_NOT_INITIALISED
        # The load will see these GPUs, but their free memory is unknown until CUDA starts.
        assert all(data["budget"][str(i)] is None for i in range(data["count"]))
    else:
        assert snapshot["cuda_state"] == CUDA_UNAVAILABLE
        assert set(data["budget"]) == {"cpu"}


def test_nvml_absent_gives_unknown():
    """With `import pynvml` failing, process lists are unknown and nothing raises."""
    data = run_fresh(
        """
        import json, sys
        sys.modules["pynvml"] = None  # makes `import pynvml` raise ImportError
        from llm_magic.measure.memory import DeviceMemory, _with_gpu_processes, memory_snapshot
        gpu = DeviceMemory("cuda:0", "GPU", 80 * 2**30, 70 * 2**30, 0, 0, uuid="0000-1111")
        rows, state = _with_gpu_processes((gpu,))
        print(json.dumps({"state": state, "processes": rows[0].processes,
                          "snapshot": memory_snapshot().to_dict()}))
        """
    )
    assert data["state"] == "not installed"
    assert data["processes"] is None
    assert data["snapshot"]["nvml_state"] in ("not queried", "not installed")


class FakeNvml(types.ModuleType):
    """Stands in for pynvml (absent here, and NVML needs a driver): exercises our handling only."""

    def __init__(self, *, init_error=None, processes=()):
        super().__init__("pynvml")
        self.init_error, self.processes, self.shutdowns = init_error, processes, 0

    def nvmlInit(self):
        if self.init_error:
            raise self.init_error

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetHandleByUUID(self, uuid):
        if uuid != "GPU-abcd":
            raise RuntimeError("NVML_ERROR_NOT_FOUND")
        return "handle"

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        return [types.SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in self.processes]


def gpu_row(uuid: str) -> DeviceMemory:
    return DeviceMemory("cuda:0", "GPU", 80 * GiB, 70 * GiB, 0, 0, uuid=uuid)


def test_nvml_failures_give_unknown(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(init_error=RuntimeError("Driver Not Loaded")))
    rows, state = _with_gpu_processes((gpu_row("abcd"),))
    assert state == "unavailable (Driver Not Loaded)" and rows[0].processes is None

    fake = FakeNvml(processes=[(1, 5 * GiB)])
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    rows, state = _with_gpu_processes((gpu_row("not-known-to-nvml"), gpu_row("abcd")))
    assert state == "ok" and fake.shutdowns == 1
    assert rows[0].processes is None  # a UUID NVML does not know: unknown, not empty
    assert rows[1].processes is not None


def test_nvml_process_list(monkeypatch):
    me = os.getpid()
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(processes=[(me, 3 * GiB), (99999999, None)]))
    (row,), _ = _with_gpu_processes((gpu_row("abcd"),))
    assert [(p.pid, p.used_bytes, p.this_process) for p in row.processes] == [
        (me, 3 * GiB, True),
        (99999999, None, False),
    ]
    # Our pid absent: another pid namespace (a container), so "is it us?" is unknown.
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(processes=[(12345, 2**64 - 1)]))
    (row,), _ = _with_gpu_processes((gpu_row("abcd"),))
    assert [(p.pid, p.used_bytes, p.this_process) for p in row.processes] == [(12345, None, None)]


def spy_on_the_loader_budget(monkeypatch) -> list[dict]:
    """Record the max_memory that from_pretrained hands to infer_auto_device_map.

    The real function still runs; the spy sits in the module holding `_get_device_map`
    (transformers 4.57 modeling_utils, 5.x integrations/accelerate).
    """
    import transformers.modeling_utils

    loader = sys.modules[transformers.modeling_utils._get_device_map.__module__]
    original, seen = loader.infer_auto_device_map, []

    def spy(*args, **kwargs):
        seen.append(dict(kwargs["max_memory"]))
        return original(*args, **kwargs)

    monkeypatch.setattr(loader, "infer_auto_device_map", spy)
    return seen


def pin_available_ram(monkeypatch, available: int) -> None:
    """Hold psutil's available RAM still, so two reads of it (ours, accelerate's) agree."""
    import psutil

    real = psutil.virtual_memory()
    monkeypatch.setattr(psutil, "virtual_memory", lambda: real._replace(available=available))


@pytest.mark.parametrize("extra", [0, 3 * GiB])
def test_cpu_budget_matches_the_installed_loader(tiny_model, monkeypatch, extra):
    from transformers import AutoModelForCausalLM

    pin_available_ram(monkeypatch, 8 * GiB)
    budget = autoload_budget(memory_snapshot(), {"cpu": extra} if extra else None)

    pin_available_ram(monkeypatch, 8 * GiB + extra)  # what the load sees after the release
    seen = spy_on_the_loader_budget(monkeypatch)
    AutoModelForCausalLM.from_pretrained(tiny_model, device_map="auto")

    assert len(seen) == 1 and set(seen[0]) == {"cpu"}
    assert budget == {"cpu": int(seen[0]["cpu"])}


def test_budget_as_max_memory_reproduces_the_load(tiny_model, monkeypatch):
    """What a pre-flight predictor does: pass the budget back as max_memory, get the same map."""
    from transformers import AutoModelForCausalLM

    pin_available_ram(monkeypatch, 500_000)  # too little for the tiny model: a cpu + disk split
    budget = autoload_budget(memory_snapshot())
    seen = spy_on_the_loader_budget(monkeypatch)
    by_itself = AutoModelForCausalLM.from_pretrained(tiny_model, device_map="auto")
    told = AutoModelForCausalLM.from_pretrained(tiny_model, device_map="auto", max_memory=budget)

    assert seen[0] == seen[1] == {"cpu": budget["cpu"]}
    assert by_itself.hf_device_map == told.hf_device_map
    assert set(told.hf_device_map.values()) == {"cpu", "disk"}


def test_budget_rules_per_version():
    def snapshot(*gpus: tuple[int, int, int]) -> MemorySnapshot:
        rows = [
            DeviceMemory(f"cuda:{i}", "GPU", 80 * GiB, free, allocated, reserved)
            for i, (free, allocated, reserved) in enumerate(gpus)
        ]
        rows.append(DeviceMemory("cpu", "RAM", 64 * GiB, 32 * GiB))
        return MemorySnapshot(tuple(rows), CUDA_MEASURED, len(gpus), "not installed")

    one = snapshot((10 * GiB, 1 * GiB, 3 * GiB))  # 2 GiB cached but unused
    assert autoload_budget(one, transformers_version="5.23.0") == {
        0: int(12 * GiB * 0.9),
        "cpu": int(32 * GiB * 0.9),
    }
    assert autoload_budget(one, transformers_version="4.57.6") == {
        0: int(10 * GiB * 0.9) + 2 * GiB,
        "cpu": 32 * GiB,
    }
    released = autoload_budget(one, {"cuda:0": 4 * GiB, "cpu": GiB}, transformers_version="4.57.6")
    assert released == {0: int(14 * GiB * 0.9) + 2 * GiB, "cpu": 33 * GiB}

    two = snapshot((10 * GiB, 0, 2 * MiB), (20 * GiB, 0, 0))
    # The second GPU holds nothing of ours: asking its free memory would create a context.
    two = MemorySnapshot(
        (two.devices[0], DeviceMemory("cuda:1", "GPU", 80 * GiB, None, 0, 0), two.devices[2]),
        CUDA_MEASURED,
        2,
        "not installed",
    )
    # Two GPUs take part: no 90% on either.
    assert autoload_budget(two, transformers_version="5.23.0") == {
        0: 10 * GiB + 2 * MiB,
        1: None,
        "cpu": int(32 * GiB * 0.9),
    }


def test_budget_with_nothing_measured():
    cpu = DeviceMemory("cpu", "RAM", 64 * GiB, None)
    assert autoload_budget(MemorySnapshot((cpu,), CUDA_NO_TORCH, None, "not queried")) == {"cpu": None}


def gpu_snapshot(*gpus, count=None, integrated=False, state=CUDA_MEASURED) -> MemorySnapshot:
    """GPUs as (driver free, allocated, reserved), or None for a GPU not measured; then 32 GiB of RAM."""
    rows = [
        DeviceMemory(f"cuda:{i}", "GPU", 80 * GiB, None, 0, 0, integrated=integrated)
        if figures is None
        else DeviceMemory(f"cuda:{i}", "GPU", 80 * GiB, *figures, integrated=integrated)
        for i, figures in enumerate(gpus)
    ]
    rows.append(DeviceMemory("cpu", "RAM", 64 * GiB, 32 * GiB))
    return MemorySnapshot(tuple(rows), state, len(gpus) if count is None else count, "not installed")


def test_free_after_release_for_predict():
    one = gpu_snapshot((10 * GiB, 1 * GiB, 3 * GiB))  # 2 GiB cached but unused
    freed = {"cuda:0": 4 * GiB, "cpu": GiB}
    # The release empties PyTorch's cache: all of it is driver-free memory again.
    assert free_after_release(one, freed) == ({"cuda:0": 16 * GiB, "cpu": 33 * GiB}, {"cuda:0": 0})
    assert free_after_release(one, freed, empty_cache=False) == (
        {"cuda:0": 16 * GiB, "cpu": 33 * GiB},
        {"cuda:0": 2 * GiB},
    )
    # A GPU the load will use but that nobody measured: unknown, never left out (left out, it
    # would make the pre-flight believe the machine has no GPU).
    not_initialised = MemorySnapshot((one.devices[-1],), CUDA_NOT_INITIALISED, 2, "not queried")
    assert free_after_release(not_initialised) == ({"cuda:0": None, "cuda:1": None, "cpu": 32 * GiB}, {})
    cpu_only = MemorySnapshot((one.devices[-1],), CUDA_UNAVAILABLE, 0, "not queried")
    assert free_after_release(cpu_only, {"cpu": GiB}) == ({"cpu": 33 * GiB}, {})


def test_loader_max_memory_counts_the_cache_as_free():
    """A fresh process has no PyTorch cache: its memory is driver-free there, cut like the rest."""
    one = gpu_snapshot((10 * GiB, 1 * GiB, 3 * GiB))
    assert loader_max_memory(one, transformers_version="5.23.0") == {0: int(12 * GiB * 0.9), "cpu": int(32 * GiB * 0.9)}
    assert loader_max_memory(one, transformers_version="4.57.6") == {0: int(12 * GiB * 0.9), "cpu": 32 * GiB}
    # What the load computes itself, in this process, keeps 4.57's cache outside the cut.
    assert autoload_budget(one, transformers_version="4.57.6")[0] == int(10 * GiB * 0.9) + 2 * GiB
    # sequential skips get_balanced_memory and its 90%; 5.x still keeps 10% of the cpu.
    assert loader_max_memory(one, transformers_version="5.23.0", sequential=True) == {
        0: 12 * GiB,
        "cpu": int(32 * GiB * 0.9),
    }
    # Integrated GPUs share host RAM: accelerate gives the cpu no budget.
    shared = gpu_snapshot((10 * GiB, 0, 0), integrated=True)
    assert loader_max_memory(shared, transformers_version="5.23.0") == {0: int(10 * GiB * 0.9)}
    # Not measurable without creating a context: pass no max_memory (the load measures, cleanly).
    assert loader_max_memory(gpu_snapshot((10 * GiB, 0, 2 * MiB), None)) is None
    assert loader_max_memory(MemorySnapshot(one.devices[-1:], CUDA_NOT_INITIALISED, 1, "not queried")) is None


def test_loader_budget_counts_gpus_like_each_version():
    # Driver memory gone but 1 GiB cached: 5.x sees a GPU with memory, 4.57's count does not, so
    # 4.57 has one GPU taking part and cuts the first key (cuda:0), whichever holds memory.
    free = {"cuda:0": GiB, "cuda:1": 10 * GiB, "cpu": 100}
    cached = {"cuda:0": GiB}
    assert loader_budget(free, cached, transformers_version="5.23.0") == {"cuda:0": GiB, "cuda:1": 10 * GiB, "cpu": 90}
    assert loader_budget(free, cached, transformers_version="4.57.6") == {"cuda:0": GiB, "cuda:1": 10 * GiB, "cpu": 100}
    alone = {"cuda:0": 0, "cuda:1": 10 * GiB, "cpu": 100}
    assert loader_budget(alone, transformers_version="5.23.0")["cuda:1"] == 10 * GiB  # the cut fell on cuda:0
    assert loader_budget({"cuda:0": None, "cpu": None}, transformers_version="5.23.0") == {"cuda:0": None, "cpu": None}


@pytest.mark.parametrize("device_map", ["auto", "sequential"])
def test_loader_max_memory_reproduces_the_load(tiny_model, monkeypatch, device_map):
    """Given as max_memory, the computed budget gives the placement of a load left to itself."""
    from transformers import AutoModelForCausalLM

    from llm_magic.measure.placement import model_placement

    pin_available_ram(monkeypatch, 500_000)  # too little for the tiny model: a cpu + disk split
    max_memory = loader_max_memory(memory_snapshot(), sequential=device_map == "sequential")
    seen = spy_on_the_loader_budget(monkeypatch)
    by_itself = AutoModelForCausalLM.from_pretrained(tiny_model, device_map=device_map)
    told = AutoModelForCausalLM.from_pretrained(tiny_model, device_map=device_map, max_memory=max_memory)

    assert seen[0] == seen[1] == max_memory
    assert set(told.hf_device_map.values()) == {"cpu", "disk"}
    assert by_itself.hf_device_map == told.hf_device_map
    assert model_placement(by_itself, "m").rows == model_placement(told, "m").rows


def test_loader_max_memory_on_a_cpu_that_holds_everything(tiny_model, monkeypatch):
    """A single-device load (5.x sets no hf_device_map then): same devices, same budget."""
    from transformers import AutoModelForCausalLM

    pin_available_ram(monkeypatch, 8 * GiB)
    max_memory = loader_max_memory(memory_snapshot())
    seen = spy_on_the_loader_budget(monkeypatch)
    by_itself = AutoModelForCausalLM.from_pretrained(tiny_model, device_map="auto")
    told = AutoModelForCausalLM.from_pretrained(tiny_model, device_map="auto", max_memory=max_memory)

    cpu = int(8 * GiB * (0.9 if transformers_major() >= 5 else 1))
    assert max_memory == {"cpu": cpu} and seen[1] == max_memory
    assert {key: int(value) for key, value in seen[0].items()} == max_memory  # 5.x computes a float
    assert {p.device.type for p in by_itself.parameters()} == {p.device.type for p in told.parameters()} == {"cpu"}
    assert getattr(by_itself, "hf_device_map", None) == getattr(told, "hf_device_map", None)


def test_to_dict_is_json():
    data = json.loads(json.dumps(memory_snapshot().to_dict()))
    assert data["devices"][-1]["device"] == "cpu"


# --- On a CUDA machine -----------------------------------------------------------------------


@pytest.mark.gpu
def test_cuda_figures_agree_with_torch():
    import torch

    tensor = torch.ones(64 * MiB // 4, device="cuda:0")
    row = memory_snapshot().device("cuda:0")
    free, total = torch.cuda.mem_get_info(0)
    reserved = torch.cuda.memory_reserved(0)

    assert row.total_bytes == total
    assert abs(row.free_bytes - free) <= MiB
    assert abs(row.allocated_bytes - torch.cuda.memory_allocated(0)) <= MiB
    assert abs(row.reserved_bytes - reserved) <= MiB
    assert abs(row.other_bytes - ((total - free) - reserved)) <= MiB
    assert row.allocated_bytes >= 64 * MiB
    assert row.name == torch.cuda.get_device_name(0)
    del tensor


@pytest.mark.gpu
def test_snapshot_after_cuda_use_measures_it():
    data = run_fresh(
        """
        import json
        import torch
        x = torch.zeros(1, device="cuda:0")
        from llm_magic.measure.memory import memory_snapshot
        print(json.dumps(memory_snapshot().to_dict()))
        """
    )
    assert data["cuda_state"] == CUDA_MEASURED
    first = data["devices"][0]
    assert first["device"] == "cuda:0" and first["free_bytes"] > 0 and first["other_bytes"] > 0
    assert data["nvml_state"] in ("ok", "not installed") or data["nvml_state"].startswith("unavailable")
    if data["nvml_state"] == "ok":
        # This process has a context on cuda:0, so NVML lists it (unless pids are namespaced).
        assert first["processes"] is not None


@pytest.mark.gpu
def test_gpu_budget_matches_the_installed_loader(tiny_model, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM

    torch.ones(1, device="cuda:0")  # CUDA measured, as in a notebook that already used it
    pin_available_ram(monkeypatch, 8 * GiB)
    budget = autoload_budget(memory_snapshot())
    seen = spy_on_the_loader_budget(monkeypatch)
    AutoModelForCausalLM.from_pretrained(tiny_model, device_map="auto")

    loader = seen[0]
    assert set(budget) == set(loader)
    assert budget["cpu"] == int(loader["cpu"])
    last = torch.cuda.device_count() - 1
    for index in range(last + 1):
        # The loader's own probe tensor may take a fresh 2 MiB block between the two reads.
        if index == last:
            assert abs(budget[index] - loader[index]) <= 4 * MiB
        else:  # balanced across GPUs: capped near model size / GPU count, never raised
            assert loader[index] <= budget[index] + 4 * MiB
