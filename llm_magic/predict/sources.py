"""Can a load even start? Where each `from_pretrained` source is, checked before anything is released.

A source is ready when it is a local directory holding a config (`config.json`, or a PEFT
adapter's `adapter_config.json`), or a hub id whose config is in the local HF cache, or (online)
one whose config the hub has: asked with a HEAD request for the config only, never a weight. With
`HF_HUB_OFFLINE` / `TRANSFORMERS_OFFLINE` set (or `local_files_only`), the network is not touched.
A source the cell computes at run time is "unknown" and does not block.

`explain_load_failure` is the other half: a load that failed inside transformers anyway, told
in one plain line.

Pure functions over plain values; they never raise.
"""

from __future__ import annotations

import difflib
import os
import sys
from dataclasses import dataclass
from typing import Any, Iterable

OK, MISSING, UNKNOWN = "ok", "missing", "unknown"

# Any one of these, next to the weights, makes a directory loadable by the kind of class.
CONFIG_FILES = ("config.json", "adapter_config.json")
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "config.json", "vocab.txt", "vocab.json",
                   "tokenizer.model", "spiece.model")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "config.json", "tokenizer_config.json")
FILES_BY_KIND = {"model": CONFIG_FILES, "config": CONFIG_FILES, "tokenizer": TOKENIZER_FILES,
                 "processor": PROCESSOR_FILES}


@dataclass(frozen=True)
class SourceCheck:
    """Whether one source can be read: "ok", "missing" (with the reason, one line) or "unknown"."""

    status: str
    model_id: str | None
    reason: str | None = None  # why it is missing or unknown
    where: str | None = None  # the directory or cached file found, or "hub" when the hub has it

    @property
    def ok(self) -> bool:
        return self.status == OK

    def to_dict(self) -> dict:
        return {"status": self.status, "model_id": self.model_id, "reason": self.reason, "where": self.where}


@dataclass(frozen=True)
class SourceProblem:
    """A `from_pretrained` call of the cell whose source cannot be read: the load would fail."""

    model_id: str
    target: str | None  # what the call is assigned to ("model")
    lineno: int
    call_source: str  # the call as written
    reason: str  # one line: "no local directory or cached model named 'path'"

    def to_dict(self) -> dict:
        return {"model_id": self.model_id, "target": self.target, "lineno": self.lineno,
                "call_source": self.call_source, "reason": self.reason}


def hub_offline(local_files_only: bool | None = None) -> bool:
    """Is the hub off limits? `local_files_only`, or offline mode as the loader sees it (the
    environment, or huggingface_hub's constant once imported): either one is enough."""
    if local_files_only:
        return True
    if any(_truthy(os.environ.get(name)) for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    constants = sys.modules.get("huggingface_hub.constants")
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in ("1", "ON", "YES", "TRUE")


def check_source(
    model_id: Any,
    *,
    revision: str | None = None,
    subfolder: str = "",
    cache_dir: str | None = None,
    local_files_only: bool | None = None,
    files: tuple[str, ...] = CONFIG_FILES,
    endpoint: str | None = None,
) -> SourceCheck:
    """Is `model_id` a source `from_pretrained` can read (see the module docstring)? Never raises.

    `files`: any one of them proves the source (a config by default; `FILES_BY_KIND` for
    tokenizers and processors). `endpoint`: the hub's address, when not the default.
    """
    if not isinstance(model_id, (str, os.PathLike)):
        return SourceCheck(UNKNOWN, None, f"the source is a {type(model_id).__name__}, not a name or path")
    name = os.fspath(model_id)
    try:
        if os.path.isdir(name):
            return _check_directory(name, subfolder or "", files)
        if os.path.exists(name):
            return SourceCheck(MISSING, name, f"{name!r} is a file, not a model directory")
        if not _valid_repo_id(name):
            return SourceCheck(MISSING, name, no_such_path(name))
        cached = _cached(name, revision, subfolder, cache_dir, files)
        if cached is not None:
            return SourceCheck(OK, name, where=cached)
        if hub_offline(local_files_only):
            return SourceCheck(MISSING, name, not_cached(name) + ", and the hub is offline")
        return _fetch(name, revision, subfolder, files, endpoint)
    except Exception as error:  # noqa: BLE001 - a check that fails must not block the load
        return SourceCheck(UNKNOWN, name, f"could not check ({type(error).__name__}: {error})")


def _check_directory(path: str, subfolder: str, files: tuple[str, ...]) -> SourceCheck:
    folder = os.path.join(path, subfolder) if subfolder else path
    if not os.path.isdir(folder):
        return SourceCheck(MISSING, path, f"{path!r} has no subfolder {subfolder!r}")
    for filename in files:
        if os.path.isfile(os.path.join(folder, filename)):
            return SourceCheck(OK, path, where=folder)
    return SourceCheck(MISSING, path, f"{folder!r} has no {files[0]}")


def _valid_repo_id(name: str) -> bool:
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except Exception:  # noqa: BLE001 - HFValidationError
        return False
    return True


def _cached(name, revision, subfolder, cache_dir, files) -> str | None:
    """The first of `files` in the local HF cache for this repo id, or None."""
    from huggingface_hub import try_to_load_from_cache

    for filename in files:
        path = f"{subfolder}/{filename}" if subfolder else filename
        found = try_to_load_from_cache(name, path, cache_dir=cache_dir, revision=revision)
        if isinstance(found, str):
            return found
    return None


def _fetch(name, revision, subfolder, files, endpoint) -> SourceCheck:
    """Ask the hub whether it has the config (a HEAD request per file: nothing is downloaded, and
    no retries, so an unreachable hub answers at once)."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    for filename in files:
        url = hf_hub_url(name, filename, subfolder=subfolder or None, revision=revision, endpoint=endpoint)
        try:
            get_hf_file_metadata(url, timeout=10)
        except EntryNotFoundError:
            continue
        except GatedRepoError:
            return SourceCheck(MISSING, name, f"{name!r} is gated: request access on its hub page, then log in")
        except RepositoryNotFoundError:
            return SourceCheck(MISSING, name, no_repo(name))
        except RevisionNotFoundError:
            return SourceCheck(MISSING, name, f"{name!r} has no revision {revision!r} on the hub")
        except Exception as error:  # noqa: BLE001
            if _unreachable(error):
                return SourceCheck(MISSING, name, not_cached(name) + ", and the hub cannot be reached")
            # A hub hiccup (5xx, a proxy): do not block the load on it.
            return SourceCheck(UNKNOWN, name, f"could not ask the hub ({type(error).__name__})")
        return SourceCheck(OK, name, where="hub")
    return SourceCheck(MISSING, name, f"{name!r} has no {files[0]} on the hub")


def _unreachable(error: BaseException) -> bool:
    """A connection that failed or timed out (httpx in huggingface_hub 1.x+, requests before)."""
    names = " ".join(cls.__name__ for cls in type(error).__mro__)
    return "Connect" in names or "Timeout" in names


def not_cached(name: str) -> str:
    return f"no local directory or cached model named {name!r}" + _did_you_mean(name)


def no_such_path(name: str) -> str:
    if _looks_like_path(name):
        return f"no local directory named {name!r}" + _did_you_mean(name)
    return f"{name!r} is neither a local directory nor a valid hub model id"


def no_repo(name: str) -> str:
    return f"no model named {name!r} on the hub (a private one needs `huggingface-cli login`)" + _did_you_mean(name)


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~", ".\\")) or os.sep in name or "/" in name or (
        len(name) > 1 and name[1] == ":")


def _did_you_mean(name: str) -> str:
    """' (did you mean './models/tiny-llama'?)' when a directory next to it has a close name."""
    parent, base = os.path.split(name.rstrip("/\\"))
    folder = parent or "."
    if not base or not os.path.isdir(folder):
        return ""
    try:
        candidates = [entry.name for entry in os.scandir(folder) if entry.is_dir() and entry.name != base]
    except OSError:
        return ""
    close = difflib.get_close_matches(base, candidates, n=1, cutoff=0.75)
    return f" (did you mean {os.path.join(parent, close[0])!r}?)" if close else ""


def check_load_sources(calls: Iterable, *, endpoint: str | None = None) -> list[SourceProblem]:
    """The calls (`calls.LoadCall`) whose source cannot be read, one problem each; [] when all can
    be, or cannot be told before the cell runs (computed sources are not blocked on)."""
    problems: list[SourceProblem] = []
    seen: dict[tuple, SourceCheck] = {}
    for call in calls:
        arguments = _check_arguments(call)
        if arguments is None:
            continue
        if arguments not in seen:
            model_id, location, files = arguments
            seen[arguments] = check_source(model_id, files=files, endpoint=endpoint, **dict(location))
        check = seen[arguments]
        if check.status == MISSING:
            problems.append(SourceProblem(check.model_id, call.target, call.lineno, call.source, check.reason))
    return problems


def _check_arguments(call) -> tuple | None:
    """(model id, location keywords, files) to check for one call, or None when it is not checked."""
    files = FILES_BY_KIND.get(call.kind)
    if files is None or not call.model_id.known:
        return None
    model_id = call.model_id.value
    if not isinstance(model_id, (str, os.PathLike)):
        return None  # e.g. PeftModel.from_pretrained(base_model, ...): the first argument is a model
    if "config" in call.config_overrides or "gguf_file" in call.location:
        return None  # an explicit config= object, or a GGUF file: the checkpoint needs no config.json
    names = ("revision", "subfolder", "cache_dir", "local_files_only")
    if any(not call.location[n].known for n in names if n in call.location):
        return None
    location = tuple((n, call.location[n].value) for n in names if n in call.location and call.location[n].value is not None)
    return os.fspath(model_id), location, files
