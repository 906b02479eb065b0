"""Prompt lengths in tokens, from what users loop over: strings, token ids, datasets, Series.

Accepted items: a string (tokenized with the tokenizer, or with its chat template as one user
message when `chat`), a list of chat messages (`[{"role": ..., "content": ...}]`, always through
the chat template), a sequence of token ids (a list, a 1-D tensor or array), or a mapping with
`input_ids` (a tokenizer's output for one prompt). The container may be a list or tuple, a
`datasets` column or Dataset of one column, a pandas Series, or a tokenizer's batch output.
"""

from __future__ import annotations

from typing import Any


class PromptError(ValueError):
    """The prompts cannot be measured; the message says why in one line."""


def prompt_lengths(prompts: Any, tokenizer: Any = None, *, chat: bool = False) -> list[int]:
    items = _items(prompts)
    if not items:
        raise PromptError("--prompts is empty")
    lengths: list[int | None] = [_length_of_ids(item) for item in items]
    texts = [index for index, length in enumerate(lengths) if length is None]
    if texts:
        if tokenizer is None:
            raise PromptError("the prompts hold text: a tokenizer is needed (pass --tokenizer NAME)")
        for index, length in zip(texts, _tokenized_lengths([items[i] for i in texts], tokenizer, chat)):
            lengths[index] = length
    return [int(length) for length in lengths]


def _items(prompts: Any) -> list:
    if isinstance(prompts, (str, bytes)):
        return [prompts]
    if isinstance(prompts, dict) or _is_batch_encoding(prompts):
        ids = prompts.get("input_ids") if hasattr(prompts, "get") else None
        if ids is None:
            raise PromptError("a mapping of prompts needs an 'input_ids' entry")
        mask = prompts.get("attention_mask")
        if mask is not None:  # a padded batch: each row's real length
            return [[0] * int(sum(int(v) for v in _as_list(row))) for row in _rows(mask)]
        return list(_rows(ids))
    column_names = getattr(prompts, "column_names", None)
    if isinstance(column_names, list) and hasattr(prompts, "features"):  # a datasets.Dataset
        if len(column_names) != 1:
            raise PromptError(f"a Dataset with columns {column_names}: pass one column, e.g. ds['text']")
        return list(prompts[column_names[0]])
    try:
        return list(prompts)
    except TypeError:
        raise PromptError(f"--prompts must be a list of prompts, not {type(prompts).__name__}") from None


def _is_batch_encoding(value: Any) -> bool:
    return type(value).__name__ == "BatchEncoding"


def _rows(value: Any) -> list:
    shape = getattr(value, "shape", None)
    if shape is not None and len(shape) == 1:
        return [value]
    return list(value)


def _as_list(value: Any) -> list:
    tolist = getattr(value, "tolist", None)
    return tolist() if callable(tolist) else list(value)


def _length_of_ids(item: Any) -> int | None:
    """The token count of an item that is already ids; None for text and chat messages."""
    if isinstance(item, str):
        return None
    if isinstance(item, dict):
        if "input_ids" in item:
            return len(_as_list(item["input_ids"]))
        raise PromptError("a prompt mapping needs 'input_ids'")
    shape = getattr(item, "shape", None)
    if shape is not None and len(shape) == 1:
        return int(shape[0])
    if isinstance(item, (list, tuple)):
        if all(isinstance(token, int) and not isinstance(token, bool) for token in item):
            return len(item)
        if all(isinstance(message, dict) and "content" in message for message in item):
            return None  # chat messages
    raise PromptError(f"cannot read a prompt of type {type(item).__name__} (text, token ids or chat messages)")


def _tokenized_lengths(items: list, tokenizer: Any, chat: bool) -> list[int]:
    conversations = [item if not isinstance(item, str) else [{"role": "user", "content": item}] for item in items]
    if chat or any(not isinstance(item, str) for item in items):
        template = getattr(tokenizer, "apply_chat_template", None)
        if not callable(template) or not getattr(tokenizer, "chat_template", None):
            raise PromptError("--chat: the tokenizer has no chat template")
        try:
            return [len(_ids(template(messages, add_generation_prompt=True, tokenize=True))) for messages in conversations]
        except Exception as error:  # noqa: BLE001
            raise PromptError(f"the chat template failed: {type(error).__name__}: {error}") from None
    try:
        encoded = tokenizer(items)
    except Exception as error:  # noqa: BLE001
        raise PromptError(f"the tokenizer failed: {type(error).__name__}: {error}") from None
    ids = encoded["input_ids"] if hasattr(encoded, "__getitem__") else None
    if ids is None:
        raise PromptError("the tokenizer returned no input_ids")
    return [len(_as_list(row)) for row in ids]


def _ids(value: Any) -> list:
    """apply_chat_template returns ids, or (transformers 5) a BatchEncoding with input_ids."""
    if hasattr(value, "keys") and "input_ids" in value.keys():
        value = value["input_ids"]
    value = _as_list(value)
    return value[0] if value and isinstance(value[0], list) else value
