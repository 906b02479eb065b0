"""Safety: no remote code unless asked, no network ever, and JSON reports for any name.

Spies wrap the real functions (from_pretrained, socket calls) and record what they were asked;
nothing is replaced by a fake: the real tiny checkpoints load as they would in a notebook.
"""

from __future__ import annotations

import json
import socket
import weakref

import pytest
from cells import LOAD, ok, run
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from IPython.utils.capture import capture_output

pytestmark = pytest.mark.usefixtures("frozen_imports")








def round_trip(data):
    """Strict JSON both ways (ASCII-escaped and raw UTF-8): the same data comes back."""
    for ensure_ascii in (True, False):
        text = json.dumps(data, allow_nan=False, ensure_ascii=ensure_ascii)
        back = json.loads(text)
        assert back == json.loads(json.dumps(back)), "not stable"
        assert _normalised(data) == back
    return json.loads(json.dumps(data))


def _normalised(value):
    """What JSON makes of plain data: tuples become lists; keys must already be strings."""
    if isinstance(value, dict):
        assert all(type(key) is str for key in value), f"non-string keys: {list(value)}"
        return {key: _normalised(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_normalised(item) for item in value]
    assert value is None or type(value) in (str, int, float, bool), f"not plain JSON data: {value!r}"
    return value


# -- trust_remote_code -----------------------------------------------------------------------


@pytest.fixture
def from_pretrained_calls(monkeypatch):
    """Wrap (not replace) the Auto classes' from_pretrained; record each call's kwargs."""
    import transformers

    calls: list[tuple[str, dict]] = []
    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer, transformers.AutoConfig):
        original = cls.from_pretrained

        def spy(*args, __original=original, __name=cls.__name__, **kwargs):
            calls.append((__name, dict(kwargs)))
            return __original(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    return calls


@pytest.fixture
def remote_code_checkpoint(tiny_model, tmp_path):
    """The tiny checkpoint plus an `auto_map` to a custom modeling file that records being run."""
    import shutil

    path = tmp_path / "with-remote-code"
    shutil.copytree(tiny_model, path)
    marker = tmp_path / "remote-code-was-executed"
    (path / "modeling_custom.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import LlamaForCausalLM\n"
        "class CustomForCausalLM(LlamaForCausalLM):\n"
        "    pass\n"
    )
    config = json.loads((path / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (path / "config.json").write_text(json.dumps(config))
    return path, marker


def test_default_loader_never_trusts_remote_code(shell, from_pretrained_calls, remote_code_checkpoint):
    path, marker = remote_code_checkpoint
    shell.user_ns["_test_path"] = str(path)
    ok(shell, "%llmload $_test_path")
    assert type(shell.user_ns["model"]).__name__ == "LlamaForCausalLM"  # the built-in class
    assert not marker.exists()  # the checkpoint's own code never ran
    loads = [(name, kwargs) for name, kwargs in from_pretrained_calls if name != "AutoConfig"]
    assert {name for name, _ in loads} == {"AutoModelForCausalLM", "AutoTokenizer"}
    assert all(kwargs.get("trust_remote_code") is False for _, kwargs in loads), loads


def test_trust_remote_code_only_when_asked(shell, from_pretrained_calls, tiny_model):
    shell.user_ns["_test_path"] = tiny_model
    ok(shell, "%llmload $_test_path --trust-remote-code")
    loads = [(name, kwargs) for name, kwargs in from_pretrained_calls if name != "AutoConfig"]
    assert {name for name, _ in loads} == {"AutoModelForCausalLM", "AutoTokenizer"}
    assert all(kwargs.get("trust_remote_code") is True for _, kwargs in loads), loads
    from_pretrained_calls.clear()
    ok(shell, "%llmload $_test_path --no-tokenizer")  # the next load is back to the default
    assert [kwargs["trust_remote_code"] for _, kwargs in from_pretrained_calls if _ != "AutoConfig"] == [False]


def test_a_body_gets_exactly_the_kwargs_the_user_wrote(shell, from_pretrained_calls, tiny_model):
    shell.user_ns["_test_path"] = tiny_model
    for options in ("", "--trust-remote-code"):  # the flag is for the empty-body loader only
        from_pretrained_calls.clear()
        ok(shell, f"%%llmload $_test_path {options}\n{LOAD}")
        assert [kwargs for name, kwargs in from_pretrained_calls if name == "AutoModelForCausalLM"] == [{}]


# -- the network -----------------------------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch):
    """Every way to open a connection raises, and is recorded. Offline mode is turned *off*, so
    a hub call anywhere would be an attempt here, not silently skipped."""
    import huggingface_hub.constants
    import transformers.utils.hub

    attempts: list[tuple] = []

    def refuse(kind):
        def blocked(*args, **kwargs):
            attempts.append((kind, args[1:] if kind.startswith("socket.") else args))
            raise OSError(f"network blocked by test: {kind}")

        return blocked

    monkeypatch.setattr(socket.socket, "connect", refuse("socket.connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", refuse("socket.connect_ex"))
    monkeypatch.setattr(socket, "create_connection", refuse("create_connection"))
    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(transformers.utils.hub, "_is_offline_mode", False, raising=False)
    return attempts


def test_blocked_sockets_really_block(no_network):
    with pytest.raises(OSError):
        socket.create_connection(("huggingface.co", 443), timeout=1)
    assert no_network == [("create_connection", (("huggingface.co", 443),))]


def test_a_whole_session_never_touches_the_network(shell, no_network, tiny_model):
    shell.user_ns["_test_path"] = tiny_model
    ok(shell, "%llmload $_test_path")
    ok(shell, "model")
    ok(shell, "%llmload $_test_path --no-tokenizer")
    ok(shell, f"%%llmload $_test_path\n{LOAD}")
    # a hub id as MODEL_NAME, and a body that builds locally: the extension itself must not
    # look the id up anywhere
    ok(shell, f"%%llmload meta-llama/Llama-3.1-8B\nfrom transformers import AutoModelForCausalLM\nmodel = AutoModelForCausalLM.from_pretrained({tiny_model!r})\n")
    run(shell, "def step(m):\n    raise RuntimeError('simulated OOM')\nstep(model)")
    for line in ("%llmfree --dry-run model", "%llmfree --hidden", "%llmfree tokenizer", "%llmfree --all"):
        ok(shell, line)
    for line in ("%gpustate", "%gpustate --all", "%gpustate --json"):
        ok(shell, line)
    assert no_network == []


# -- JSON for any name -----------------------------------------------------------------------

WEIRD = 'd["we\'ird \\"key\\""]'
NEWLINE = 'd["line one\\nline two"]'


def test_reports_are_json_for_weird_names(shell, tiny_model):
    shell.user_ns["_test_path"] = tiny_model
    ok(shell, "d = {}")  # the body fills it; it does not replace it
    body = (
        "from transformers import AutoModelForCausalLM\n"
        f"{WEIRD} = AutoModelForCausalLM.from_pretrained(MODEL_NAME)\n"
        f"{NEWLINE} = {WEIRD}\n"
        "модель = AutoModelForCausalLM.from_pretrained(MODEL_NAME)\n"
        "模型 = модель\n"
    )
    ok(shell, f"%%llmload $_test_path\n{body}")
    old = [weakref.ref(shell.user_ns["d"]["we'ird \"key\""]), weakref.ref(shell.user_ns["модель"])]
    report = ok(shell, f"%%llmload $_test_path -o\n{body}")
    data = round_trip(report.to_dict())
    released = {item["label"]: item for item in data["released"]["released"]}
    weird, newline = 'd[\'we\\\'ird "key"\']', "d['line one\\nline two']"
    assert set(released) == {weird, "модель"}
    assert set(released[weird]["cleared"]) == {weird, newline} and released[weird]["freed"]
    assert set(released["модель"]["cleared"]) == {"модель", "模型"} and released["модель"]["freed"]
    assert {model["name"] for model in data["models"]} == {weird, "модель"}
    assert all(ref() is None for ref in old)
    for path in released:
        assert eval(path, shell.user_ns) is not None  # each label is an expression that works

    run(shell, "d")  # a copy in Out: hidden labels carry the keys too
    ok(shell, "keep = dict(d)\ndel d")
    freed = ok(shell, "%llmfree --hidden -o")
    labels = set(round_trip(freed.to_dict())["also_cleared"])
    assert labels and all(label.startswith(("Out[", "_")) or label == "last result" for label in labels)
    held = ok(shell, "%llmfree модель -o")
    assert round_trip(held.to_dict())["released"][0]["held_by"][0] == "模型"
    report = ok(shell, "%%llmload name -o\nx = 1")
    kept = {holder["path"] for holder in round_trip(report.to_dict())["kept"]}
    assert {"keep['we\\'ird \"key\"']", "模型"} <= kept


def test_llmfree_takes_a_key_with_a_space(shell):
    ok(shell, "import torch\nd = {'my model': torch.nn.Linear(2, 2)}")
    result = ok(shell, "%llmfree d['my model'] -o")
    assert result.released[0].label == "d['my model']" and "my model" not in shell.user_ns["d"]


def test_llmfree_by_weird_names_through_the_engine(shell):
    """The same names, through run_llmfree (what the magic would call with correct splitting)."""
    from llm_magic.commands.llmfree import run_llmfree

    ok(shell, f"import torch\nd = {{}}\n{WEIRD} = torch.nn.Linear(2, 2)\n{NEWLINE} = torch.nn.Linear(2, 2)\nмодель = torch.nn.Linear(2, 2)")
    result = run_llmfree(shell, [WEIRD, NEWLINE, "модель"])
    data = round_trip(result.to_dict())
    assert [item["label"] for item in data["released"]] == ['d[\'we\\\'ird "key"\']', "d['line one\\nline two']", "модель"]
    assert result.all_freed and shell.user_ns["d"] == {} and "модель" not in shell.user_ns


_key = st.text(max_size=12)


def _fill(shell, keys):
    """`d` and `keep`: two dicts with the same modules under the same keys (no local copies)."""
    import torch

    modules = [torch.nn.Linear(2, 2) for _ in keys]
    shell.user_ns["d"] = dict(zip(keys, modules))
    shell.user_ns["keep"] = dict(zip(reversed(keys), reversed(modules)))


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(keys=st.lists(_key, min_size=1, max_size=4, unique=True))
@example(keys=["we'ird \"key\"", "line one\nline two", "модель", ""])
@example(keys=["\\", "\x00\t\r", "'''\"\"\"", "{x} $y %z", "模型\u2028"])
def test_any_dict_key_gives_valid_json_and_typeable_paths(shell, keys):
    _fill(shell, keys)

    report = shell.run_cell_magic("llmload", "name -o", "x = 1")
    kept = [holder["path"] for holder in round_trip(report.to_dict())["kept"]]
    assert {f"d[{key!r}]" for key in keys} <= set(kept)
    for path in kept:
        assert eval(path, shell.user_ns) is not None  # typeable: it evaluates to the holder

    result = shell.run_line_magic("llmfree", "d -o")
    data = round_trip(result.to_dict())
    [item] = data["released"]
    assert not item["freed"] and item["held_by"]  # `keep` still holds every module
    for path in item["held_by"]:
        if not path.startswith("..."):
            assert path.startswith("keep[") and eval(path, shell.user_ns) is not None

    result = shell.run_line_magic("llmfree", "--all -o")
    assert result.all_freed
    round_trip(result.to_dict())


def test_gpustate_json_is_valid_for_weird_names(shell):
    ok(shell, f"import torch\nd = {{}}\n{WEIRD} = torch.nn.Linear(2, 2)\n{NEWLINE} = torch.nn.Linear(2, 2)\nмодель = torch.nn.Linear(2, 2)\n模型 = torch.zeros(10)")
    for line in ("%gpustate --json", "%gpustate --json --all"):
        with capture_output() as captured:
            shell.run_line_magic("gpustate", line.split(" ", 1)[1])
        round_trip(json.loads(captured.stdout))
