"""A load that failed inside transformers, told in one plain line.

transformers wraps huggingface_hub's errors in OSErrors with several lines of advice, and the
cause sits further down the exception chain. The most specific explanation found anywhere in
the chain wins. Types are matched by name (huggingface_hub moves them
between modules), messages by the phrases transformers 4.57 and 5.x write. None when the
failure is not about finding the checkpoint.
"""

from __future__ import annotations

import os
import re
from typing import Callable

from llm_magic.engine.exceptions import exception_chain
from llm_magic.predict.sources import check_source, hub_offline, no_repo, no_such_path

_WEIGHT_FILE = re.compile(r"(no file named|does not appear to have a file named) (pytorch_model\.bin|model\.safetensors)")


def explain_load_failure(exc: BaseException, model_id: str | None) -> str | None:
    """One line ("no config.json in /path", "'org/name' is not in the local cache and the hub is
    offline", ...) for a `from_pretrained` that raised `exc`; None when it cannot say."""
    try:
        name = os.fspath(model_id) if isinstance(model_id, (str, os.PathLike)) else None
        links = [({cls.__name__ for cls in type(link).__mro__}, str(link)) for link in exception_chain(exc)]
        # Rule by rule, each over the whole chain: a gated repo's cause outranks the generic
        # "not a valid model identifier" transformers wraps it in.
        for matches, explain in _RULES:
            for kinds, message in links:
                if matches(kinds, message):
                    return explain(name or _quoted_id(message) or "the model")
        check = check_source(name) if name is not None and os.path.isdir(name) else None
        if check is not None and not check.ok:
            # A directory without a config fails in many ways (4.57 even guesses a model type
            # from the path's letters): the missing config is the cause.
            return check.reason
    except Exception:  # noqa: BLE001 - explaining must never add a failure of its own
        return None
    return None


def _quoted_id(message: str) -> str | None:
    found = re.search(r"'([^']+)'", message)
    return found.group(1) if found else None


def _offline_or_unreachable(name: str) -> str:
    where = "the hub is offline" if hub_offline() else "the hub cannot be reached"
    return f"{name!r} is not in the local cache and {where}"


def _no_config(name: str) -> str:
    return f"{name!r} has no config.json"


def _config_without_type(name: str) -> str:
    if os.path.isdir(name) and not check_source(name).ok:
        return _no_config(name)
    return f"the config.json of {name!r} names no model_type"


Rule = tuple[Callable[[set, str], bool], Callable[[str], str]]

# Most specific first: the gated and revision errors are also "repository not found" errors.
_RULES: list[Rule] = [
    (lambda kinds, text: "HFValidationError" in kinds or text.startswith("Repo id must"), no_such_path),
    (lambda kinds, text: "GatedRepoError" in kinds or "access a gated repo" in text or "is a gated repository" in text,
     lambda name: f"{name!r} is gated: request access on its hub page, then log in"),
    (lambda kinds, text: "RevisionNotFoundError" in kinds or "is not a valid git identifier" in text,
     lambda name: f"{name!r} has no such revision on the hub"),
    (lambda kinds, text: "RepositoryNotFoundError" in kinds or "is not a valid model identifier" in text,
     no_repo),
    (lambda kinds, text: "OfflineModeIsEnabled" in kinds or "LocalEntryNotFoundError" in kinds
     or "couldn't connect to" in text, _offline_or_unreachable),
    (lambda kinds, text: "does not appear to have a file named config.json" in text, _no_config),
    (lambda kinds, text: "Unrecognized model in" in text and "model_type" in text, _config_without_type),
    (lambda kinds, text: _WEIGHT_FILE.search(text) is not None,
     lambda name: f"no weight files (model.safetensors or pytorch_model.bin) in {name}"),
]
