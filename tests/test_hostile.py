"""Hostile namespaces: the scan, the release and the report survive what notebooks really hold.

Objects whose dunder methods raise or lie, proxies, huge / deep / cyclic containers, tensor
subclasses, views, meta and tied models, Ctrl-C in the middle of a release or a load, the
magics called outside IPython, gc disabled. Everything runs through the real magics in a real
InteractiveShell (the `shell` fixture), and every "freed" is checked with a weak reference.
"""

from __future__ import annotations

import gc
import json
import signal
import sys
import time
import weakref

import pytest
from cells import LOAD, ok, run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from IPython.utils.capture import capture_output

from llm_magic.ipython.magics import LLMMagic

pytestmark = pytest.mark.usefixtures("frozen_imports")

# Hypothesis runs many examples against one shell: the fixture is reset by hand between them.
FAST = settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])








def load(shell, path, body=LOAD, options="-o"):
    shell.user_ns["_test_path"] = path
    return run(shell, f"%%llmload $_test_path {options}\n{body}")


def assert_plain_json(data):
    """Strict JSON (no NaN/Infinity) that round-trips: only str keys, only plain values."""
    back = json.loads(json.dumps(data, allow_nan=False))
    assert back == _plain(data)
    return back


def _plain(value):
    if isinstance(value, dict):
        assert all(type(key) is str for key in value), list(value)
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    assert value is None or type(value) in (str, int, float, bool), repr(value)
    return value


def dead(*refs):
    gc.collect()
    return all(ref() is None for ref in refs)


# -- objects whose dunders raise or lie ------------------------------------------------------

HOSTILE = '''
import torch, weakref

class RaisingGetattr:
    def __getattr__(self, name):
        raise RuntimeError("__getattr__ " + name)

class RaisingGetattribute:
    def __getattribute__(self, name):
        raise RuntimeError("__getattribute__ " + name)

class PretendsToBeAModule:
    @property
    def __class__(self):
        return torch.nn.Module

class PretendsToBeATensor:
    @property
    def __class__(self):
        return torch.Tensor

class RaisingClass:
    @property
    def __class__(self):
        raise RuntimeError("__class__")

class EqualsEverything:
    def __eq__(self, other):
        return True
    def __ne__(self, other):
        return False
    def __hash__(self):
        return 0

class RaisingHash:
    def __eq__(self, other):
        raise RuntimeError("__eq__")
    def __hash__(self):
        raise RuntimeError("__hash__")

class NegativeLength:
    def __len__(self):
        return -1
    def __bool__(self):
        raise RuntimeError("__bool__")
    def __iter__(self):
        raise RuntimeError("__iter__")

class RaisingRepr:
    def __repr__(self):
        raise RuntimeError("__repr__")
    __str__ = __repr__

dict_reads = []

class RaisingDict:
    @property
    def __dict__(self):
        dict_reads.append("raise")
        raise RuntimeError("__dict__")

class LyingDict:
    @property
    def __dict__(self):
        dict_reads.append("lie")
        return {"ghost": torch.nn.Linear(7, 7)}

class LyingList(list):
    def __iter__(self):
        raise RuntimeError("__iter__")
    def __len__(self):
        return -1

class LyingDictType(dict):
    def items(self):
        raise RuntimeError("items")
    def __iter__(self):
        raise RuntimeError("__iter__")
    def __len__(self):
        return -1

class EqualsEveryClass(type):
    """A metaclass whose classes all compare equal, with one hash: caches keyed on classes lie."""
    def __eq__(cls, other):
        return True
    def __hash__(cls):
        return 0

class MetaGhost(metaclass=EqualsEveryClass):
    @property
    def __dict__(self):
        dict_reads.append("meta")
        return {"ghost": torch.nn.Linear(7, 7)}

class MetaHolder(metaclass=EqualsEveryClass):
    pass

ghost_meta = MetaGhost()  # seen first: a class-keyed cache would hand its layout on
h_meta = MetaHolder()
h_meta.weights = torch.nn.Linear(8, 8)

HOSTILE_KINDS = [
    RaisingGetattr, RaisingGetattribute, PretendsToBeAModule, PretendsToBeATensor, RaisingClass,
    EqualsEverything, RaisingHash, NegativeLength, RaisingRepr,
]
hostile = {}
for kind in HOSTILE_KINDS:
    obj = kind()
    object.__setattr__(obj, "weights", torch.nn.Linear(8, 8))
    hostile[kind.__name__] = obj
    globals()["h_" + kind.__name__] = obj
h_list = LyingList([torch.nn.Linear(8, 8)])
h_dict = LyingDictType(w=torch.nn.Linear(8, 8))
h_raising_dict = RaisingDict()
h_lying_dict = LyingDict()
weight_refs = {"h_" + name: weakref.ref(object.__getattribute__(obj, "weights")) for name, obj in hostile.items()}
weight_refs["h_meta"] = weakref.ref(h_meta.weights)
weight_refs["h_list"] = weakref.ref(list.__getitem__(h_list, 0))
weight_refs["h_dict"] = weakref.ref(dict.__getitem__(h_dict, "w"))
del obj, kind, hostile
'''


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

PROXIES = '''
import types, weakref
class Forward:
    """A transparent wrapper, as adapters and tracing tools write them."""
    def __init__(self, target):
        object.__setattr__(self, "_target", target)
    def __getattr__(self, name):
        return getattr(object.__getattribute__(self, "_target"), name)
    def __setattr__(self, name, value):
        setattr(object.__getattribute__(self, "_target"), name, value)
class Plain:
    pass
plain = Plain()
plain_proxy = weakref.proxy(plain)
def function():
    pass
callable_proxy = weakref.proxy(function)
model_proxy = weakref.proxy(model)
'''


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


# -- bodies and names nested deeper than Python's recursion limit ----------------------------


def test_long_expression_body_loads(shell):
    """`x = 1 + 1 + ...` with 600 terms compiles in Python: %%llmload must run it too."""
    report = ok(shell, "%%llmload name -o\nimport torch\nmodel = torch.nn.Linear(2, 2)\ntotal = " + " + ".join(["1"] * 600))
    assert shell.user_ns["total"] == 600 and [m.name for m in report.models] == ["model"]


def test_too_deep_body_and_name_are_clean_errors(shell):
    ok(shell, "import torch, weakref\nmodel = torch.nn.Linear(2, 2)\nold = weakref.ref(model)")
    deep_body = "model = torch.nn.Linear(2, 2)\nx = a" + ".b" * 5000
    deep_name = "model" + ".weight" * 5000
    for cell in (f"%%llmload name\n{deep_body}", f"%llmfree {deep_name}"):
        result, captured = run(shell, cell)
        output = captured.stdout + captured.stderr
        assert "UsageError" in output and "Traceback" not in output and len(output) < 2000, output[:500]
        assert shell.user_ns["old"]() is shell.user_ns["model"]  # nothing was released


# -- huge, deep and cyclic containers --------------------------------------------------------


def test_million_item_containers_stay_bounded_and_never_fake_a_free(shell):
    body = "import torch\nmodel = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU())\n"
    ok(shell, f"%%llmload small -o\n{body}")
    ok(
        shell,
        "big_dict = {-1: torch.zeros(1000)}\n"
        "big_dict.update((i, str(i)) for i in range(1_000_000))\n"
        "big_list = [object() for _ in range(1_000_000)]\n"
        "big_list.append(model)  # a holder past any walk budget\n",
    )
    old = weakref.ref(shell.user_ns["model"])
    start = time.perf_counter()
    dry = ok(shell, "%llmfree --all --dry-run -o")
    assert time.perf_counter() - start < 15
    # big_list's only tensor holder sits past the budget: not proven to hold tensors, so
    # --all does not touch the user's data
    assert {item.label for item in dry.released} == {"model", "big_dict"}
    assert_plain_json(dry.to_dict())
    start = time.perf_counter()
    report = ok(shell, f"%%llmload small -o\n{body}")
    assert time.perf_counter() - start < 20
    [item] = report.released.released
    # the only holder hides behind a million objects: perhaps not found, but never called freed
    assert not item.freed and item.held_by and old() is not None
    ok(shell, "del big_list[-1]")
    assert dead(old)


def test_deeply_nested_structures(shell, tiny_model):
    load(shell, tiny_model)
    ok(
        shell,
        "deep_list = []\n"
        "node = deep_list\n"
        "for _ in range(10_000):\n"
        "    node.append([])\n"
        "    node = node[0]\n"
        "node.append(model)\n"
        "deep_dict = {}\n"
        "node = deep_dict\n"
        "for _ in range(10_000):\n"
        "    node['k'] = {}\n"
        "    node = node['k']\n"
        "import torch\n"
        "node['t'] = torch.zeros(10)\n"
        "class Link:\n"
        "    pass\n"
        "chain = Link()\n"
        "node = chain\n"
        "for _ in range(10_000):\n"
        "    node.next = Link()\n"
        "    node = node.next\n"
        "node.tensor = torch.ones(10)\n"
        "del node\n",
    )
    old = weakref.ref(shell.user_ns["model"])
    result, captured = load(shell, tiny_model)
    assert result.success, captured.stdout
    [item] = result.result.released.released
    assert not item.freed and item.held_by[0] == "deep_list" + "[0]" * 10_001
    assert_plain_json(result.result.to_dict())
    everything = ok(shell, "%llmfree --all -o")
    assert {"deep_list", "deep_dict", "chain"} <= {item.label for item in everything.released}
    assert everything.all_freed and dead(old)


def test_cycles(shell, tiny_model):
    load(shell, tiny_model)
    ok(
        shell,
        "loop = []\nloop.append(loop)\nloop.append(model)\n"
        "selfdict = {}\nselfdict['me'] = selfdict\n"
        "class Node:\n    pass\n"
        "a, b = Node(), Node()\n"
        "a.other, b.other = b, a\n"
        "a.model = model\n",
    )
    old = weakref.ref(shell.user_ns["model"])
    freed_a = ok(shell, "%llmfree a -o")
    [item] = freed_a.released
    assert not item.freed and item.held_by[0] == "b.other"
    everything = ok(shell, "%llmfree --all -o")
    assert everything.all_freed and dead(old)
    assert shell.user_ns["selfdict"]["me"] is shell.user_ns["selfdict"]  # no tensors: untouched


CLOSURE = "import torch\ndef make(m):\n    return lambda: m\nmodel = {model}\nclosure = make(model)\n"


def test_unnamed_holder_description_names_only_real_referrers(shell):
    ok(shell, CLOSURE.format(model="torch.nn.Linear(4, 4)"))
    report = ok(shell, "%%llmload name -o\nx = 1\nmodel = torch.nn.Linear(4, 4)")
    [item] = report.released.released
    assert not item.freed
    text = "; ".join(item.held_by)
    assert "cell" in text  # the closure's cell: the real holder
    assert "list" not in text, text


def test_unnamed_holder_search_does_not_scan_the_heap_per_tensor(shell, monkeypatch):
    ok(shell, CLOSURE.format(model="torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(50)])"))
    scans = []
    real = gc.get_referrers
    monkeypatch.setattr(gc, "get_referrers", lambda *objs: scans.append(len(objs)) or real(*objs))
    report = ok(shell, "%%llmload name -o\nx = 1\nmodel = 1")
    assert not report.released.released[0].freed
    assert len(scans) <= 2, f"{len(scans)} full heap scans for one unnamed model"


# Random object graphs: modules hidden anywhere in lists, tuples, dicts, objects and cycles.
_leaf = st.sampled_from(["module", "tensor", "int", "str", "none"])
_shape = st.recursive(
    _leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4).map(lambda items: ("list", items)),
        st.lists(inner, max_size=4).map(lambda items: ("tuple", items)),
        st.dictionaries(st.text(max_size=5), inner, max_size=4).map(lambda items: ("dict", items)),
        st.lists(inner, max_size=3).map(lambda items: ("object", items)),
        st.lists(inner, max_size=3).map(lambda items: ("cycle", items)),
    ),
    max_leaves=20,
)


def _build(shape, refs, torch):
    if shape == "module":
        value = torch.nn.Linear(2, 2)
        refs.append(weakref.ref(value))
        return value
    if shape == "tensor":
        value = torch.zeros(3)
        refs.append(weakref.ref(value))
        return value
    if not isinstance(shape, tuple):
        return {"int": 7, "str": "s", "none": None}[shape]
    kind, items = shape
    if kind == "dict":
        return {key: _build(value, refs, torch) for key, value in items.items()}
    built = [_build(item, refs, torch) for item in items]
    if kind == "tuple":
        return tuple(built)
    if kind == "object":
        holder = type("Holder", (), {})()
        for index, value in enumerate(built):
            setattr(holder, f"a{index}", value)
        return holder
    if kind == "cycle":
        built.append(built)
    return built


@FAST
@given(shapes=st.lists(_shape, min_size=1, max_size=4))
def test_random_graphs_are_released_completely(shell, shapes):
    import torch

    refs: list[weakref.ref] = []
    names = {f"v{index}": _build(shape, refs, torch) for index, shape in enumerate(shapes)}
    shell.user_ns.update(names)
    shell.user_ns["bystander"] = bystander = [1, 2, 3]
    names.clear()
    before = {name: id(value) for name, value in shell.user_ns.items()}
    dry = shell.run_line_magic("llmfree", "--all --dry-run -o")
    assert {name: id(value) for name, value in shell.user_ns.items()} == before
    result = shell.run_line_magic("llmfree", "--all -o")
    assert result.all_freed
    assert dead(*refs)
    assert {item.label for item in result.released} == {item.label for item in dry.released}
    assert shell.user_ns["bystander"] is bystander
    for name in list(shell.user_ns):
        if name.startswith("v") and name[1:].isdigit():
            del shell.user_ns[name]  # the holders of no tensor stay: clean up for the next example


# -- tensors that are not plain tensors ------------------------------------------------------

TENSORS = '''
import torch, numpy as np, weakref

class Traced(torch.Tensor):
    calls = 0
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        Traced.calls += 1
        return super().__torch_function__(func, types, args, kwargs or {})

class Refusing(torch.Tensor):
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError("no torch function for you")

traced = torch.zeros(1000).as_subclass(Traced)
refusing = torch.zeros(2000).as_subclass(Refusing)
param = torch.nn.Parameter(torch.zeros(500))
array = np.zeros(10_000)
base = torch.zeros(4000)
view = base[:100]
with torch.device("meta"):
    meta_model = torch.nn.Sequential(torch.nn.Linear(100, 100), torch.nn.Linear(100, 100))

class Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(100, 16)
        self.head = torch.nn.Linear(16, 100, bias=False)
        self.head.weight = self.embed.weight

tied = Tied()
tensor_refs = {name: weakref.ref(globals()[name]) for name in ("traced", "refusing", "param", "base", "view", "meta_model", "tied", "array")}
Traced.calls = 0
'''


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


# -- Ctrl-C ----------------------------------------------------------------------------------

INTERRUPTING = '''
import signal, weakref, torch

def press_ctrl_c(_ref=None):
    signal.raise_signal(signal.SIGINT)

class CtrlCWhenCollected:
    """In a reference cycle: dies in gc.collect(), and a Ctrl-C arrives right then."""
    def __init__(self):
        self.me = self
        self.weights = torch.zeros(100)
    def __del__(self):
        press_ctrl_c()
'''


@FAST
@given(count=st.integers(1, 5), data=st.data())
def test_ctrl_c_during_release_is_all_or_nothing(shell, count, data):
    """A Ctrl-C when the k-th object dies (weakref callback): every target is still released,
    hidden copies too, bystanders untouched, and the interrupt is reported, then raised."""
    ok(shell, INTERRUPTING)
    k = data.draw(st.integers(0, count - 1), label="interrupting target")
    shown = data.draw(st.lists(st.integers(0, count - 1), unique=True), label="also in Out")
    torch = sys.modules["torch"]
    names = [f"t{i}" for i in range(count)]
    for name in names:
        shell.user_ns[name] = torch.nn.Linear(4, 4)
    for index in shown:
        run(shell, names[index])
    refs = [weakref.ref(shell.user_ns[name]) for name in names]
    alarm = weakref.ref(shell.user_ns[names[k]], shell.user_ns["press_ctrl_c"])
    shell.user_ns["bystander"] = bystander = torch.ones(3)
    with capture_output() as captured, pytest.raises(KeyboardInterrupt):
        shell.run_line_magic("llmfree", " ".join(names))
    assert "Freed:" in captured.stdout  # the report was shown before the interrupt
    assert all(ref() is None for ref in refs) and alarm() is None  # freed inside the release
    assert not any(name in shell.user_ns for name in names)
    assert not any(isinstance(out, torch.nn.Linear) for out in shell.user_ns["Out"].values())
    assert shell.user_ns["bystander"] is bystander
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def no_escape(call, *args):
    """Call the engine directly; a KeyboardInterrupt escaping would end the pytest session."""
    try:
        return call(*args)
    except KeyboardInterrupt:
        pytest.fail("a KeyboardInterrupt escaped the release")


def test_ctrl_c_during_release_reports_interrupted(shell):
    from llm_magic.commands.llmfree import run_llmfree

    ok(shell, INTERRUPTING + "a = torch.nn.Linear(4, 4)\nb = torch.nn.Linear(4, 4)\nalarm = weakref.ref(a, press_ctrl_c)\n")
    refs = [weakref.ref(shell.user_ns["a"]), weakref.ref(shell.user_ns["b"])]
    result = no_escape(run_llmfree, shell, ["a", "b"])
    assert result.interrupted and result.all_freed and dead(*refs)


def test_ctrl_c_before_the_release_changes_nothing(shell):
    """Ctrl-C while names are still being resolved (a property on the way): nothing released."""
    ok(
        shell,
        INTERRUPTING
        + "class Box:\n"
        "    def __init__(self):\n"
        "        self._model = torch.nn.Linear(4, 4)\n"
        "    @property\n"
        "    def model(self):\n"
        "        press_ctrl_c()\n"
        "        return self._model\n"
        "first = torch.nn.Linear(4, 4)\n"
        "box = Box()\n",
    )
    before = dict(shell.user_ns)
    for cell in ("%llmfree first box.model", "%%llmload name\nfirst = 1\nbox.model = 2"):
        result, captured = run(shell, cell)
        assert isinstance(result.error_in_exec, KeyboardInterrupt)
        assert shell.user_ns["first"] is before["first"] and shell.user_ns["box"] is before["box"]
        assert "Released" not in captured.stdout


def test_ctrl_c_during_llmload_release_stops_before_the_body(shell):
    ok(shell, INTERRUPTING + "ran = []\nmodel = torch.nn.Linear(4, 4)\nalarm = weakref.ref(model, press_ctrl_c)\n")
    old = weakref.ref(shell.user_ns["model"])
    result, captured = run(shell, "%%llmload name\nran.append(1)\nmodel = torch.nn.Linear(4, 4)")
    assert isinstance(result.error_in_exec, KeyboardInterrupt)
    assert shell.user_ns["ran"] == [] and "model" not in shell.user_ns  # released, not reloaded
    assert dead(old)
    assert "freed" in captured.stdout


def test_ctrl_c_during_the_engines_gc_is_not_lost(shell):
    from llm_magic.commands.llmfree import run_llmfree

    ok(shell, INTERRUPTING + "cyclic = CtrlCWhenCollected()\nprobe = weakref.ref(cyclic)\n")
    gc.collect()
    result = no_escape(run_llmfree, shell, ["cyclic"])
    assert dead(shell.user_ns["probe"]) and result.all_freed
    assert result.interrupted


def test_ctrl_c_during_llmload_gc_does_not_run_the_body(shell):
    ok(shell, INTERRUPTING + "ran = []\nmodel = CtrlCWhenCollected()\n")
    result, captured = run(shell, "%%llmload name\nran.append(1)\nmodel = torch.nn.Linear(4, 4)")
    assert isinstance(result.error_in_exec, KeyboardInterrupt)
    assert shell.user_ns["ran"] == []


def test_body_interrupted_mid_load(shell, tiny_model):
    load(shell, tiny_model)
    old = weakref.ref(shell.user_ns["model"])
    body = (
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "tokenizer = AutoTokenizer.from_pretrained(MODEL_NAME)\n"
        "raise KeyboardInterrupt\n"
        "model = AutoModelForCausalLM.from_pretrained(MODEL_NAME)\n"
    )
    result, captured = load(shell, tiny_model, body)
    assert isinstance(result.error_in_exec, KeyboardInterrupt)
    assert dead(old)  # released before the body ran: not resurrected, not half there
    assert "model" not in shell.user_ns and "tokenizer" in shell.user_ns
    assert shell.user_ns["MODEL_NAME"] == tiny_model
    assert captured.stdout.index("Released") < captured.stdout.index("KeyboardInterrupt")


def test_interrupt_inside_from_pretrained_leaves_nothing_behind(shell, tiny_model, monkeypatch):
    """Ctrl-C inside the default loader after the weights are in memory: `model` is not bound,
    the half-loaded model survives only in the traceback, and `%llmfree --hidden` frees it."""
    import transformers

    loaded = []
    original = transformers.AutoModelForCausalLM.from_pretrained

    def interrupted_load(*args, **kwargs):
        model = original(*args, **kwargs)
        loaded.append(weakref.ref(model))
        raise KeyboardInterrupt

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", interrupted_load)
    shell.user_ns["_test_path"] = tiny_model
    result, captured = run(shell, "%llmload $_test_path")
    assert isinstance(result.error_in_exec, KeyboardInterrupt)
    assert "model" not in shell.user_ns and "tokenizer" in shell.user_ns
    gc.collect()
    assert loaded[0]() is not None  # the traceback keeps it: a hidden holder
    freed = ok(shell, "%llmfree --hidden -o")
    assert any("last traceback" in item.label for item in freed.released)
    assert dead(loaded[0])


# -- outside IPython -------------------------------------------------------------------------

def _outside_calls():
    import llm_magic
    from llm_magic.commands.llmfree import run_llmfree
    from llm_magic.commands.llmload import LoadOptions, run_llmload

    return {
        "load_ipython_extension(None)": lambda: llm_magic.load_ipython_extension(None),
        "LLMMagic(shell=None).llmfree('x')": lambda: LLMMagic(shell=None).llmfree("x"),
        "LLMMagic(shell=None).llmfree('--all')": lambda: LLMMagic(shell=None).llmfree("--all"),
        "LLMMagic(shell=None).llmload('x')": lambda: LLMMagic(shell=None).llmload("x"),
        "LLMMagic(shell=None).llmload('x', body)": lambda: LLMMagic(shell=None).llmload("x", "model = 1"),
        "run_llmfree(None, ['x'])": lambda: run_llmfree(None, ["x"]),
        "run_llmfree(None, [], everything=True)": lambda: run_llmfree(None, [], everything=True),
        "run_llmload(None, ...)": lambda: run_llmload(None, LoadOptions("x"), "model = 1"),
    }


@pytest.mark.parametrize("call", list(_outside_calls()))
def test_outside_ipython_is_a_clear_error(call):
    with pytest.raises(Exception) as info:
        _outside_calls()[call]()
    assert not isinstance(info.value, AttributeError), repr(info.value)
    assert "ipython" in str(info.value).lower() or "shell" in str(info.value).lower()


def test_unload_outside_ipython_is_a_no_op():
    import llm_magic

    llm_magic.unload_ipython_extension(None)


# -- gc disabled -----------------------------------------------------------------------------


def test_back_to_back_loads_with_gc_disabled(shell, tiny_model):
    load(shell, tiny_model)
    ok(shell, "class Cyclic:\n    pass\nholder = Cyclic()\nholder.me = holder\nholder.model = model\ndel holder")
    refs = [weakref.ref(shell.user_ns["model"])]
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(2):
            result, captured = load(shell, tiny_model)
            assert result.success, captured.stdout
            assert result.result.released.all_freed
            # no gc.collect() here: the engine's own collection must have freed it
            assert all(ref() is None for ref in refs)
            refs = [weakref.ref(shell.user_ns["model"])]
        assert not gc.isenabled()  # the engine collects; it does not turn gc back on
    finally:
        if was_enabled:
            gc.enable()


# -- nothing but the reported targets changes ------------------------------------------------


def _snapshot(shell):
    return (
        {name: id(value) for name, value in shell.user_ns.items()},
        {key: id(value) for key, value in shell.user_ns["Out"].items()},
    )


def _released_labels(result) -> tuple[set[str], bool]:
    """Every label a LoadReport or ReleaseResult says it dropped, and whether it was a dry run."""
    release = result.released if hasattr(result, "model_name") else result
    labels = set(release.also_cleared)
    for item in release.released:
        labels |= {item.label, *item.cleared}
    return labels, release.dry_run


def _checked(shell, cell, *, body_names=(), report=True):
    """Run a magic cell; assert only its reported targets and IPython's bookkeeping changed."""
    count = shell.execution_count
    names_before, out_before = _snapshot(shell)
    result, captured = run(shell, cell)
    assert result.success, captured.stdout + captured.stderr
    names_after, out_after = _snapshot(shell)
    labels, dry_run = _released_labels(result.result) if report else (set(), True)
    dropped = set() if dry_run else labels  # a dry run may name targets, never change them
    allowed = {"_i", "_ii", "_iii", f"_i{count}", "In", "_ih", "Out", "_oh"} | set(body_names) | dropped
    if result.result is not None:
        allowed |= {"_", "__", "___", f"_{count}"}
    changed = {name for name in names_before.keys() | names_after.keys() if names_before.get(name) != names_after.get(name)}
    assert changed <= allowed, (cell, changed - allowed)
    out_changed = {key for key in out_before.keys() | out_after.keys() if out_before.get(key) != out_after.get(key)}
    assert out_changed <= {count} | {key for key in out_before if f"Out[{key}]" in dropped}, (cell, out_changed)
    for label in dropped:  # and what it says it dropped, it did drop
        if label in names_before and label not in ("_", "__", "___", *body_names):
            assert label not in names_after, label
    return result.result


def test_only_reported_targets_change(shell, tiny_model):
    shell.user_ns["_test_path"] = tiny_model
    ok(shell, HOSTILE + PROXIES.replace("model_proxy = weakref.proxy(model)", "") + "import torch\nbystander = torch.ones(5)\nnumbers = [1, 2]")
    body = LOAD + "box = {'m': model}\n"
    _checked(shell, f"%%llmload $_test_path -o\n{body}", body_names={"model", "box", "AutoModelForCausalLM", "MODEL_NAME"})
    run(shell, "model")  # Out, _N and _ hold it now
    run(shell, "def step(m):\n    raise RuntimeError('simulated OOM')\nstep(model)")
    _checked(shell, f"%%llmload $_test_path -o\n{body}", body_names={"model", "box", "AutoModelForCausalLM", "MODEL_NAME"})
    _checked(shell, "%llmload $_test_path --no-tokenizer -o", body_names={"model", "MODEL_NAME"})
    _checked(shell, "%llmload $_test_path -o", body_names={"model", "tokenizer", "MODEL_NAME"})
    run(shell, "model")
    run(shell, "other = torch.nn.Linear(3, 3)")
    run(shell, "other")
    run(shell, "del other")
    _checked(shell, "%llmfree box['m'] --dry-run -o")
    assert "box" in shell.user_ns and "m" in shell.user_ns["box"]
    _checked(shell, "%llmfree --all --dry-run -o")
    _checked(shell, "%llmfree --hidden -o")
    _checked(shell, "%llmfree box['m'] -o")
    _checked(shell, "%llmfree bystander tokenizer -o")
    _checked(shell, "%llmfree --all -o")
    _checked(shell, "%llmfree --hidden -o")
    for line in ("%gpustate", "%gpustate --all --deep", "%gpustate --json", "%gpustate -o"):
        _checked(shell, line, report=False)
    assert shell.user_ns["numbers"] == [1, 2]


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
