"""`%llmfit`: the longest prompt that fits and the items that will not, checked against real runs.

The users' story: a loop over 120 prompts where item 100 is 8x longer than the rest, with a
memory budget that fits the short ones. `%llmfit` must name item 100 before the loop runs, and
the real `generate` calls (their peaks read from the cpu allocator) must agree: the short items
fit the budget and item 100 does not.
"""

from __future__ import annotations

import json

import pytest
from IPython.core.error import UsageError
from support.realpeak import generate_peak, no_eos
from support.tinymodels import build_tiny_tokenizer, tiny_config
from transformers import AutoModelForCausalLM

from llm_magic.commands.llmfit import FitError, parse_budget
from llm_magic.predict.generation import GenerationPredictor

SHORT, LONG, NEW = 24, 192, 8  # item 100 is 8x longer


@pytest.fixture
def loaded(shell):
    """A tiny eager llama (scores grow with the square of the prompt) and a tokenizer."""
    model = no_eos(AutoModelForCausalLM.from_config(tiny_config("llama"), attn_implementation="eager").eval())
    shell.user_ns.update(model=model, tokenizer=build_tiny_tokenizer())
    return shell


def fit(shell, line: str):
    return shell.run_line_magic("llmfit", line)


def weights(model) -> int:
    """Parameters and buffers (the rotary tables too): what sits on the device besides generation."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def test_users_story_names_item_100_before_the_loop_runs(loaded, capsys):
    model = loaded.user_ns["model"]
    loaded.user_ns["prompts"] = [[5] * (LONG if i == 100 else SHORT) for i in range(120)]
    predictor = GenerationPredictor.for_model(model)
    short, long = (predictor.peaks(1, n, NEW)["cpu"] for n in (SHORT, LONG))
    room = (short + long) // 2  # fits the short ones, not item 100
    fit(loaded, f"model --prompts prompts --max-new-tokens {NEW} --budget cpu={weights(model) + room}B --json")
    report = json.loads(capsys.readouterr().out)
    assert report["first_failing_item"] == 100
    assert [item["index"] for item in report["items"] if not item["fits"]] == [100]
    item = report["items"][100]
    assert item["tokens"] == LONG and item["missing_bytes"]["cpu"] == long - room
    assert item["peak_bytes"]["cpu"] == weights(model) + long
    assert SHORT <= report["max_prompt_tokens"] < LONG
    assert report["context_window"] == 256
    # The loop, run for real: the short items stay within the budget, item 100 goes over it.
    assert generate_peak(model, 1, SHORT, NEW) <= room < generate_peak(model, 1, LONG, NEW)
    assert generate_peak(model, 1, report["max_prompt_tokens"], NEW) <= room * 1.01


def test_the_sentence_names_the_item_and_what_to_do(loaded):
    model = loaded.user_ns["model"]
    loaded.user_ns["prompts"] = [[5] * (LONG if i == 5 else SHORT) for i in range(8)]
    predictor = GenerationPredictor.for_model(model)
    room = predictor.peaks(2, 100, NEW)["cpu"]
    report = fit(loaded, f"model --prompts prompts --batch 2 --max-new-tokens {NEW} --budget cpu={weights(model) + room}B -o")
    assert report.first_failing_item == 4  # batch (4, 5), padded to item 5's length
    assert report.first_failing.startswith(f"item 4 ({SHORT} tokens, its batch padded to {LONG}) needs ")
    assert f"truncate to {report.max_prompt_tokens:,} tokens" in report.first_failing
    assert "use batch 1" in report.first_failing  # item 4 alone (24 tokens) fits
    assert [item.index for item in report.failing] == [4, 5]
    assert predictor.peaks(2, report.max_prompt_tokens, NEW)["cpu"] <= room < predictor.peaks(2, report.max_prompt_tokens + 1, NEW)["cpu"]


def test_bare_lengths_and_the_default_capacity(loaded, capsys):
    report = fit(loaded, "model --tokens 10 200 --max-new-tokens 16 -o")
    assert [item.tokens for item in report.items] == [10, 200] and all(item.fits for item in report.items)
    assert report.capacity_from == {"cpu": "free now"}
    assert report.max_prompt_tokens == 256 - 16  # capped by the context window
    assert "prompts up to 240 tokens fit at batch 1 with 16 new tokens" in str(report)
    over = fit(loaded, "model --tokens 10 250 --max-new-tokens 16 -o")  # 250 + 16 > 256
    assert [item.fits for item in over.items] == [True, False] and over.first_failing_item == 1
    assert over.first_failing == "item 1 (250 tokens) does not fit the 256-token context with 16 new tokens — truncate to 240 tokens"


def test_text_prompts_are_tokenized_with_the_named_tokenizer(loaded):
    loaded.user_ns["tok"] = loaded.user_ns.pop("tokenizer")
    loaded.user_ns["texts"] = ["w1 w2 w3", "w4 " * 50]
    report = fit(loaded, "model --prompts texts --tokenizer tok -o")
    tokenizer = loaded.user_ns["tok"]
    assert [item.tokens for item in report.items] == [len(tokenizer(t)["input_ids"]) for t in loaded.user_ns["texts"]]


def test_chat_prompts_go_through_the_chat_template(loaded):
    tokenizer = loaded.user_ns["tokenizer"]
    tokenizer.chat_template = "{% for m in messages %}<s> {{ m['content'] }} </s> {% endfor %}"
    loaded.user_ns["texts"] = ["w1 w2", "w3 " * 10]
    report = fit(loaded, "model --prompts texts --chat -o")
    assert [item.tokens for item in report.items] == [2 + 2, 10 + 2]  # <s> and </s> around each


def test_pandas_series_and_datasets_column(loaded):
    import datasets
    import pandas

    texts = ["w1 w2 w3", "w5 " * 7]
    loaded.user_ns["series"] = pandas.Series(texts)
    loaded.user_ns["ds"] = datasets.Dataset.from_dict({"text": texts})
    expected = [3, 7]
    assert [item.tokens for item in fit(loaded, "model --prompts series -o").items] == expected
    assert [item.tokens for item in fit(loaded, "model --prompts ds['text'] -o").items] == expected
    assert [item.tokens for item in fit(loaded, "model --prompts ds -o").items] == expected  # one column


@pytest.mark.parametrize(
    "line,message",
    [
        ("nothere", "no variable 'nothere'"),
        ("tokenizer", "tokenizer is a [A-Za-z]+, not a model"),
        ("bert", "does not generate text"),
        ("model --budget gpu=3GiB", "unknown device 'gpu'"),
        ("model --budget cpu=lots", "cannot read 'cpu=lots'"),
        ("model --prompts texts --tokenizer none_here", "a tokenizer is needed"),
        ("model --prompts undefined_name", "--prompts: NameError"),
        ("model --batch 0", "--batch must be at least 1"),
        ("model --tokens 0", "lengths must be at least 1"),
    ],
)
def test_bad_input_is_one_line_and_changes_nothing(loaded, line, message):
    from transformers import BertConfig, BertModel

    loaded.user_ns["bert"] = BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                                  num_attention_heads=2, intermediate_size=37))
    loaded.user_ns["texts"] = ["w1 w2"]
    before = dict(loaded.user_ns)
    with pytest.raises(UsageError, match=message) as raised:
        fit(loaded, line)
    assert "\n" not in str(raised.value)
    assert set(loaded.user_ns) == set(before) and all(loaded.user_ns[k] is before[k] for k in before)


def test_budget_strings():
    assert parse_budget("cuda:0=15GiB,cpu=12GiB") == {"cuda:0": 15 << 30, "cpu": 12 << 30}
    assert parse_budget("0=1.5GB, cpu=800MiB") == {"cuda:0": 1_500_000_000, "cpu": 800 << 20}
    assert parse_budget("cuda=1GiB,mps=2GiB") == {"cuda:0": 1 << 30, "mps:0": 2 << 30}  # names as names.py spells them
    for bad in ("", "cuda:0", "cuda:0=", "cuda:0=1XB", "disk=1GiB"):
        with pytest.raises(FitError):
            parse_budget(bad)
