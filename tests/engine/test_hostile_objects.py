"""Objects whose dunders raise or lie, proxies and tensor subclasses: the scan, the release and
the report survive them, run no user code, and never fake a free (weak references prove it)."""

from __future__ import annotations

import json
import sys
import weakref

import pytest
from cells import llmload as load
from cells import ok, run
from support.hostile import (
    HOSTILE,
    PROXIES,
    TENSORS,
    assert_plain_json,
    dead,
)

pytestmark = pytest.mark.usefixtures("frozen_imports")


# -- objects whose dunders raise or lie ------------------------------------------------------



def _hostile_names(shell):
    """The hostile holders whose real `__dict__` (or items) hold a module."""
    return {name for name in shell.user_ns if name.startswith("h_")} - {"h_raising_dict", "h_lying_dict"}


def test_hostile_objects_survive_scan_release_and_report(shell, tiny_model):
    ok(shell, HOSTILE)
    run(shell, "h_RaisingRepr")  # a result whose repr raises still lands in Out
    run(shell, "h_lying_dict")
    load(shell, tiny_model)
    old = weakref.ref(shell.user_ns["model"])

    dry = ok(shell, "%llmfree --all --dry-run -o")
    labels = {item.label for item in dry.released}
    assert _hostile_names(shell) <= labels
    assert not {"h_lying_dict", "h_raising_dict", "ghost_meta"} & labels  # no ghost holdings
    assert_plain_json(dry.to_dict())

    result, captured = load(shell, tiny_model)  # a reload with all of them around
    assert result.success, captured.stdout + captured.stderr
    assert dead(old) and result.result.released.all_freed
    kept = {holder.path for holder in result.result.kept}
    assert {"h_RaisingGetattr.weights", "h_list[0]", "h_dict['w']"} <= kept
    assert_plain_json(result.result.to_dict())

    hidden = ok(shell, "%llmfree --hidden -o")
    assert_plain_json(hidden.to_dict())
    everything = ok(shell, "%llmfree --all -o")
    assert everything.all_freed and not everything.interrupted
    assert_plain_json(everything.to_dict())
    refs = shell.user_ns["weight_refs"]
    assert dead(*refs.values()), [name for name, ref in refs.items() if ref() is not None]
    assert not any(name in shell.user_ns for name in refs)
    # A `__dict__` property is user code: never run by a scan, its lie never believed.
    assert shell.user_ns["dict_reads"] == []
    assert "h_lying_dict" in shell.user_ns and "h_raising_dict" in shell.user_ns


def test_hostile_objects_released_by_name(shell):
    ok(shell, HOSTILE)
    refs = shell.user_ns["weight_refs"]
    # an attribute path through a raising __getattribute__: refused, nothing released
    result, captured = run(shell, "%llmfree h_RaisingGetattribute.weights")
    assert "nothing was released" in captured.stdout + captured.stderr
    assert "Traceback" not in captured.stdout + captured.stderr
    assert refs["h_RaisingGetattribute"]() is not None
    names = ["h_RaisingGetattr", "h_RaisingGetattribute", "h_RaisingClass", "h_RaisingHash", "h_NegativeLength", "h_list", "h_dict"]
    result = ok(shell, f"%llmfree {' '.join(names)} -o")
    assert [item.label for item in result.released] == names
    for item in result.released:
        assert item.freed and item.label not in shell.user_ns
        assert item.bytes_by_device == {"cpu": 8 * 8 * 4 + 8 * 4}
    assert dead(*(refs[name] for name in names))


def test_container_whose_class_raises_is_a_target(shell):
    """`%llmfree c['m']` and `%%llmload` with `c['m'] = ...` where `c.__class__` raises."""
    ok(
        shell,
        "import torch, weakref\n"
        "class Store:\n"
        "    def __init__(self):\n"
        "        object.__setattr__(self, 'data', {})\n"
        "    @property\n"
        "    def __class__(self):\n"
        "        raise RuntimeError('__class__')\n"
        "    def __getitem__(self, key):\n"
        "        return self.data[key]\n"
        "    def __setitem__(self, key, value):\n"
        "        self.data[key] = value\n"
        "    def __delitem__(self, key):\n"
        "        del self.data[key]\n"
        "store = Store()\n"
        "store['m'] = torch.nn.Linear(4, 4)\n"
        "first = weakref.ref(store['m'])\n",
    )
    result = ok(shell, "%llmfree store['m'] -o")
    assert result.released[0].freed and dead(shell.user_ns["first"])
    ok(shell, "store['m'] = torch.nn.Linear(4, 4)\nsecond = weakref.ref(store['m'])")
    # (the assignment is not the body's first line: IPython's own prefilter trips over a
    # first line starting with an object whose `__class__` raises)
    report = ok(shell, "%%llmload name -o\nx = 1\nstore['m'] = torch.nn.Linear(4, 4)")
    assert [item.label for item in report.released.released] == ["store['m']"]
    assert report.released.all_freed and dead(shell.user_ns["second"])


def test_container_that_refuses_to_drop_is_reported_held_not_crashed(shell):
    """A `__delitem__`/`__delattr__` that raises: the release goes on and says who holds it."""
    ok(
        shell,
        "import torch, weakref\n"
        "class Stubborn(dict):\n"
        "    def __delitem__(self, key):\n"
        "        raise RuntimeError('no')\n"
        "class Sticky:\n"
        "    def __delattr__(self, name):\n"
        "        raise RuntimeError('no')\n"
        "    def __setattr__(self, name, value):\n"
        "        if value is None:\n"
        "            raise RuntimeError('no')\n"
        "        object.__setattr__(self, name, value)\n"
        "first = torch.nn.Linear(4, 4)\n"
        "cache = Stubborn(m=torch.nn.Linear(4, 4))\n"
        "box = Sticky()\n"
        "box.model = torch.nn.Linear(4, 4)\n"
        "refs = [weakref.ref(first), weakref.ref(cache['m']), weakref.ref(box.model)]\n",
    )
    result = ok(shell, "%llmfree first cache['m'] box.model -o")
    first, cached, boxed = result.released
    assert first.freed and dead(shell.user_ns["refs"][0]) and "first" not in shell.user_ns
    assert not cached.freed and "cache['m']" in cached.held_by
    assert not boxed.freed and "box.model" in boxed.held_by
    report = ok(shell, "%%llmload name -o\nx = 1\nbox.model = torch.nn.Linear(4, 4)")
    assert "box.model" in report.released.released[0].held_by
    assert dead(shell.user_ns["refs"][2])  # the body replaced it


def test_class_pretending_to_be_a_model_is_not_measured(shell):
    ok(shell, HOSTILE)
    report = ok(shell, "%%llmload name -o\nmodel = PretendsToBeAModule()\ntensor = PretendsToBeATensor()")
    assert isinstance(shell.user_ns["model"], sys.modules["torch"].nn.Module)  # the lie works on isinstance
    assert report.models == () and report.error is None
    assert not any(holder.path in ("model", "tensor") for holder in report.kept)
    assert_plain_json(report.to_dict())


# -- proxies ---------------------------------------------------------------------------------



def test_weakref_proxy_to_model_does_not_keep_or_fake_it(shell, tiny_model):
    load(shell, tiny_model)
    ok(shell, PROXIES)
    old = weakref.ref(shell.user_ns["model"])
    freed_name = ok(shell, "%llmfree model_proxy -o")
    [item] = freed_name.released
    assert item.bytes_by_device == {} and freed_name.freed_bytes == {}  # a proxy owns nothing
    assert old() is shell.user_ns["model"]
    ok(shell, "model_proxy = weakref.proxy(model)")
    result, captured = load(shell, tiny_model)
    assert result.success, captured.stdout
    assert dead(old) and result.result.released.all_freed
    # the proxy is dead now: every magic still works with it in the namespace
    for line in ("%llmfree --all --dry-run -o", "%llmfree --hidden -o", "%llmfree model_proxy plain_proxy -o"):
        assert_plain_json(ok(shell, line).to_dict())


def test_forwarding_wrapper_is_named_as_holder(shell, tiny_model):
    load(shell, tiny_model)
    ok(shell, PROXIES + "wrapped = Forward(model)\n")
    old = weakref.ref(shell.user_ns["model"])
    result, _ = load(shell, tiny_model)
    [item] = result.result.released.released
    assert not item.freed and item.held_by[0] == "wrapped._target"
    assert old() is not None
    freed = ok(shell, "%llmfree wrapped -o")
    assert freed.released[0].freed and dead(old)


def test_mapping_proxy_is_walked(shell, tiny_model):
    load(shell, tiny_model)
    ok(shell, "import types\nfrozen = types.MappingProxyType({'m': model, 'n': 1})")
    old = weakref.ref(shell.user_ns["model"])
    result, _ = load(shell, tiny_model)
    [item] = result.result.released.released
    assert not item.freed and item.held_by[0] == "frozen['m']"
    everything = ok(shell, "%llmfree --all -o")
    assert "frozen" in {item.label for item in everything.released} and dead(old)


# -- tensors that are not plain tensors ------------------------------------------------------



def test_tensor_kinds_are_measured_without_running_user_code(shell):
    ok(shell, TENSORS)
    dry = ok(shell, "%llmfree --all --dry-run -o")
    sizes = {item.label: item.bytes_by_device for item in dry.released}
    assert sizes == {
        "traced": {"cpu": 4000},
        "refusing": {"cpu": 8000},  # its __torch_function__ raises: the bytes are still there
        "param": {"cpu": 2000},
        "base": {"cpu": 16000},
        "view": {"cpu": 16000},  # a view holds its base's whole storage
        "meta_model": {},  # no memory behind meta tensors
        "tied": {"cpu": 6400},  # the tied weight once
    }
    assert shell.user_ns["Traced"].calls == 0  # measuring never went through __torch_function__


def test_view_keeps_base_storage_alive_and_is_counted_once(shell):
    ok(shell, TENSORS)
    refs = shell.user_ns["tensor_refs"]
    base_only = ok(shell, "%llmfree base -o")
    assert not base_only.released[0].freed and base_only.freed_bytes == {}
    everything = ok(shell, "%llmfree --all -o")
    assert everything.all_freed
    assert everything.freed_bytes == {"cpu": 4000 + 8000 + 2000 + 16000 + 6400}  # base's storage once
    assert dead(*(ref for name, ref in refs.items() if name != "array"))
    assert refs["array"]() is shell.user_ns["array"]  # numpy memory is not ours to free


def test_meta_and_tied_models_through_llmload(shell):
    body = (
        "import torch\n"
        "def make_tied():\n"
        "    tied = torch.nn.Module()\n"
        "    tied.embed = torch.nn.Embedding(100, 16)\n"
        "    tied.head = torch.nn.Linear(16, 100, bias=False)\n"
        "    tied.head.weight = tied.embed.weight\n"
        "    return tied\n"
        "with torch.device('meta'):\n"
        "    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))\n"
        "tied = make_tied()\n"
    )
    first = ok(shell, f"%%llmload meta -o\n{body}")
    data = assert_plain_json(first.to_dict())
    names = {placement["name"] for placement in data["models"]}
    assert names == {"model", "tied"}
    refs = [weakref.ref(shell.user_ns["model"]), weakref.ref(shell.user_ns["tied"])]
    second = ok(shell, f"%%llmload meta -o\n{body}")
    released = {item.label: item for item in second.released.released}
    assert released["tied"].bytes_by_device == {"cpu": 6400} and released["model"].bytes_by_device == {}
    assert second.released.all_freed and dead(*refs)
    assert_plain_json(second.to_dict())


# -- %gpustate -------------------------------------------------------------------------------


def test_gpustate_survives_hostile_namespace(shell, tiny_model):
    load(shell, tiny_model)
    ok(shell, HOSTILE + TENSORS + "import types\nfrozen = types.MappingProxyType({'m': model})\nloop = [model]\nloop.append(loop)")
    run(shell, "h_RaisingRepr")
    for line in ("", "--all", "--json", "--json --all", "--deep --all", "--deep -o"):
        result, captured = run(shell, f"%gpustate {line}")
        assert result.success, (line, captured.stdout + captured.stderr)
        if "--json" in line:
            rows = {row["path"]: row for row in json.loads(captured.stdout)["holders"]["rows"]}
            assert rows["refusing"]["bytes_by_device"] == {"cpu": 8000}
            # The proxy's model is the named one: listed once, under its name.
            assert "model" in rows and [p for p, row in rows.items() if row["type"] == "LlamaForCausalLM"] == ["model"]
        if "-o" in line:
            assert_plain_json(result.result.to_dict())
    assert shell.user_ns["dict_reads"] == []
    assert shell.user_ns["Traced"].calls == 0


def test_gpustate_deep_with_unnamed_tensor_subclass(shell):
    ok(
        shell,
        TENSORS
        + "def make():\n"
        "    hidden = torch.zeros(3000).as_subclass(Refusing)\n"
        "    traced = torch.zeros(3000).as_subclass(Traced)\n"
        "    return lambda: (hidden, traced)\n"
        "closure = make()\n"
        "Traced.calls = 0\n",
    )
    result, captured = run(shell, "%gpustate --deep --json")
    assert result.success, captured.stdout + captured.stderr
    assert shell.user_ns["Traced"].calls == 0
