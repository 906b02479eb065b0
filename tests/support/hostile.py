"""Shared by the hostile-namespace tests: the hostile objects (as cell source), and helpers.

Objects whose dunder methods raise or lie, proxies, tensor subclasses, objects that press
Ctrl-C while they are collected. Each constant is the source of a cell the tests run in a real
InteractiveShell, so the objects live where a notebook's would.
"""

from __future__ import annotations

import gc
import json

from hypothesis import HealthCheck, settings

# Hypothesis runs many examples against one shell: the fixture is reset by hand between them.
FAST = settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


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


CLOSURE = "import torch\ndef make(m):\n    return lambda: m\nmodel = {model}\nclosure = make(model)\n"


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
