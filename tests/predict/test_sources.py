"""Before anything is released: can each `from_pretrained` source be read? And, after a failed
load, one plain line saying why. Real directories, a real HF cache layout, a local stand-in hub."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap

import pytest
from support.fakehub import COMMIT, FakeHub, config_bytes

from llm_magic.predict.calls import find_load_calls
from llm_magic.predict.failures import explain_load_failure
from llm_magic.predict.sources import (
    MISSING,
    OK,
    UNKNOWN,
    check_load_sources,
    check_source,
)


def hub_cache(root, repo: str, files: dict[str, str]) -> str:
    """A HF cache holding `repo` as huggingface_hub lays it out: refs/main -> snapshots/<commit>/."""
    folder = root / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for name, text in files.items():
        (snapshot / name).write_text(text)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(COMMIT)
    return str(root)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("the network was touched")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr("huggingface_hub.hf_hub_download", refuse)


@pytest.fixture
def online(monkeypatch):
    """Offline mode off for this test (the suite runs offline), as huggingface_hub reads it."""
    import huggingface_hub.constants

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


# --------------------------------------------------------------------------- local directories


def test_local_checkpoints(tiny_model, tmp_path):
    assert check_source(tiny_model).status == OK
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    assert check_source(str(adapter)).status == OK  # a PEFT adapter directory
    nested = tmp_path / "repo"
    shutil.copytree(tiny_model, nested / "base")
    assert check_source(str(nested), subfolder="base").status == OK
    assert check_source(str(nested)).reason == f"{str(nested)!r} has no config.json"
    assert check_source(str(nested), subfolder="bsae").reason == f"{str(nested)!r} has no subfolder 'bsae'"


def test_an_empty_directory_and_a_file(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    check = check_source(str(empty))
    assert (check.status, check.reason) == (MISSING, f"{str(empty)!r} has no config.json")
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"x")
    assert check_source(str(weights)).reason == f"{str(weights)!r} is a file, not a model directory"


def test_typos_in_paths_suggest_the_close_name(tiny_model, tmp_path, no_network):
    root = tmp_path / "models"
    shutil.copytree(tiny_model, root / "tiny-llama")
    typo = str(root / "tiny-lama")
    check = check_source(typo)
    assert check.status == MISSING
    assert check.reason == f"no local directory named {typo!r} (did you mean {str(root / 'tiny-llama')!r}?)"
    far = str(root / "something-else")
    assert check_source(far).reason == f"no local directory named {far!r}"


def test_relative_paths_and_the_literal_string_path(tiny_model, tmp_path, monkeypatch, no_network):
    """`%%llmload path` (the README's placeholder) and `models/tiny-lama` look like hub ids."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_model, tmp_path / "models" / "tiny-llama")
    assert check_source("models/tiny-llama").status == OK
    literal = check_source("path", cache_dir=str(tmp_path / "cache"))
    assert (literal.status, literal.reason) == (
        MISSING, "no local directory or cached model named 'path', and the hub is offline")
    typo = check_source("models/tiny-lama", cache_dir=str(tmp_path / "cache"))
    assert typo.reason == ("no local directory or cached model named 'models/tiny-lama' (did you mean "
                           "'models/tiny-llama'?), and the hub is offline")
    assert check_source("a b/c d").reason == "no local directory named 'a b/c d'"


# --------------------------------------------------------------------------- the HF cache


def test_a_hub_id_in_the_offline_cache(tmp_path, no_network):
    cache = hub_cache(tmp_path / "hub", "org/tiny", {"config.json": "{}"})
    found = check_source("org/tiny", cache_dir=cache)
    assert found.status == OK and found.where.endswith(f"snapshots/{COMMIT}/config.json")
    missing = check_source("org/absent", cache_dir=cache)
    assert missing.reason == "no local directory or cached model named 'org/absent', and the hub is offline"
    adapter = hub_cache(tmp_path / "hub2", "org/lora", {"adapter_config.json": "{}"})
    assert check_source("org/lora", cache_dir=adapter).status == OK


def test_hf_home_cache_in_a_fresh_process(tmp_path):
    """The cache where HF_HOME puts it, found with no cache_dir, by a process started offline."""
    hub_cache(tmp_path / "home" / "hub", "org/tiny", {"config.json": "{}"})
    code = textwrap.dedent("""
        import json
        from llm_magic.predict.sources import check_source
        print(json.dumps([check_source(m).to_dict() for m in ("org/tiny", "org/other", "path")]))
    """)
    env = {**os.environ, "HF_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                         check=True, timeout=120).stdout
    tiny, other, path = json.loads(out.strip().splitlines()[-1])
    assert tiny["status"] == OK and str(tmp_path / "home" / "hub") in tiny["where"]
    assert other["status"] == MISSING and path["status"] == MISSING


# --------------------------------------------------------------------------- online: config only


def test_online_asks_the_hub_for_the_config_and_nothing_else(tmp_path, online):
    repos = {"org/tiny": {"config.json": config_bytes(), "model.safetensors": b"weights"},
             "org/lora": {"adapter_config.json": b"{}"}, "org/weights-only": {"model.safetensors": b"w"}}
    with FakeHub(repos, gated=("org/gated",)) as hub:
        def check(name):
            return check_source(name, cache_dir=str(tmp_path / "cache"), endpoint=hub.endpoint)

        assert check("org/tiny").status == OK
        assert check("org/lora").status == OK
        assert check("org/weights-only").reason == "'org/weights-only' has no config.json on the hub"
        assert check("org/absent").reason.startswith("no model named 'org/absent' on the hub")
        assert check("org/gated").reason.startswith("'org/gated' is gated")
    assert hub.requests and all(path.endswith(("/config.json", "/adapter_config.json")) for path in hub.requests)
    assert not (tmp_path / "cache").exists()  # asked, not downloaded


def test_online_with_local_files_only_does_not_ask(tmp_path, online, no_network):
    check = check_source("org/tiny", cache_dir=str(tmp_path / "cache"), local_files_only=True)
    assert check.reason == "no local directory or cached model named 'org/tiny', and the hub is offline"


def test_online_but_unreachable(tmp_path, online):
    import huggingface_hub

    if int(huggingface_hub.__version__.split(".")[0]) < 1:
        # The same code; huggingface_hub 0.x retries a refused connection for 23 s before giving up.
        pytest.skip("huggingface_hub 0.x retries refused connections for 23 s")
    unreachable = check_source("org/tiny", cache_dir=str(tmp_path / "cache"), endpoint="http://127.0.0.1:9")
    assert unreachable.reason == "no local directory or cached model named 'org/tiny', and the hub cannot be reached"


# --------------------------------------------------------------------------- the calls of a cell


def test_check_load_sources_over_a_cells_calls(tiny_model, tmp_path, no_network):
    cell = textwrap.dedent("""
        tok = AutoTokenizer.from_pretrained(GOOD)
        model = AutoModelForCausalLM.from_pretrained("path", device_map="auto")
        other = AutoModelForCausalLM.from_pretrained(pick_one())
        peft = PeftModel.from_pretrained(model_obj, GOOD)
        bad = AutoModelForCausalLM.from_pretrained(TYPO, subfolder="x")
    """)
    typo = str(tmp_path / "nowhere")
    calls = find_load_calls(cell, {"GOOD": tiny_model, "TYPO": typo, "model_obj": object()})
    problems = check_load_sources(calls)
    assert [(p.target, p.model_id, p.lineno) for p in problems] == [("model", "path", 3), ("bad", typo, 6)]
    assert problems[0].reason == "no local directory or cached model named 'path', and the hub is offline"
    assert problems[1].reason == f"no local directory named {typo!r}"
    assert check_load_sources(calls[:1]) == []  # the tokenizer's directory is fine
    gguf = find_load_calls("m = AutoModelForCausalLM.from_pretrained('org/q', gguf_file='q4.gguf')\n"
                           "c = AutoModelForCausalLM.from_pretrained('org/q', config=CFG)", {"CFG": object()})
    assert check_load_sources(gguf) == []  # neither needs the repo's config.json
    assert check_source(object()).status == UNKNOWN


# --------------------------------------------------------------------------- failed loads, explained


def failure_of(name):
    from transformers import AutoModelForCausalLM

    try:
        AutoModelForCausalLM.from_pretrained(name)
    except Exception as error:  # noqa: BLE001
        return error
    raise AssertionError(f"{name} loaded")


def test_failed_loads_in_one_line(tiny_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert explain_load_failure(failure_of("path"), "path") == "'path' is not in the local cache and the hub is offline"
    absent = str(tmp_path / "absent" / "model")
    assert explain_load_failure(failure_of(absent), absent) == f"no local directory named {absent!r}"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert explain_load_failure(failure_of(str(empty)), str(empty)) == f"{str(empty)!r} has no config.json"
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    shutil.copy(os.path.join(tiny_model, "config.json"), config_only)
    assert explain_load_failure(failure_of(str(config_only)), str(config_only)) == (
        f"no weight files (model.safetensors or pytorch_model.bin) in {config_only}")
    assert explain_load_failure(ValueError("a bug of the user's"), "x") is None


def hub_error(hub, name, tmp_path):
    """The real huggingface_hub error for `name`, wrapped as transformers wraps it (`cached_file`)."""
    from huggingface_hub import hf_hub_download

    try:
        hf_hub_download(name, "config.json", cache_dir=str(tmp_path / "cache"), endpoint=hub.endpoint)
    except Exception as error:  # noqa: BLE001
        wrapped = OSError(f"{name} is not a local folder and is not a valid model identifier listed on "
                          "'https://huggingface.co/models'")
        wrapped.__cause__ = error
        return wrapped
    raise AssertionError(f"{name} was found")


def test_hub_errors_explained(tmp_path, online):
    with FakeHub({"org/weights-only": {"model.safetensors": b"w"}}, gated=("org/gated",)) as hub:
        gated, absent = hub_error(hub, "org/gated", tmp_path), hub_error(hub, "org/absent", tmp_path)
    assert explain_load_failure(gated, "org/gated") == "'org/gated' is gated: request access on its hub page, then log in"
    assert explain_load_failure(absent, "org/absent") == (
        "no model named 'org/absent' on the hub (a private one needs `huggingface-cli login`)")
    unreachable = OSError("We couldn't connect to 'http://127.0.0.1:9' to load the files")
    assert explain_load_failure(unreachable, "org/m") == "'org/m' is not in the local cache and the hub cannot be reached"
