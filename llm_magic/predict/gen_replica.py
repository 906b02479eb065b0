"""A fake replica of a model with one decoder layer per kind, and the generate steps run on it.

The replica is the model's own class, built from a copy of its config on the meta device with
`num_hidden_layers` (and `layer_types`) cut to the picked layers, then given fake parameters in
the real model's dtypes. The user's model is never touched: nothing of it is run or changed.
When the cut config does not rebuild the picked layers as they are (a family whose layer
structure depends on the index in a way the cut loses), the replica keeps every layer.

`Simulator` runs the model's own `generate` on it (gen_trace) for the steps that can peak: the
prefill of T tokens, the first decoding step after it (sliding layers still hold the whole
prompt), and a decoding step with C tokens cached (sliding layers trimmed to their window).
Results are cached per shape.
"""

from __future__ import annotations

import copy
from typing import Any

from llm_magic.compat import transformers as tf
from llm_magic.measure.layer_types import text_config
from llm_magic.predict import gen_fake
from llm_magic.predict.gen_layout import GenLayout, layer_shapes
from llm_magic.predict.gen_trace import StepTrace, run_generate


def _cut_config(config: Any, picks: tuple[int, ...]) -> Any:
    config = copy.deepcopy(config)
    text = text_config(config)
    text.num_hidden_layers = len(picks)
    for name in ("layer_types", "layers_block_type"):
        values = getattr(text, name, None)
        if isinstance(values, (list, tuple)) and len(values) > max(picks):
            setattr(text, name, [values[index] for index in picks])
    return config


def _on_meta(layout: GenLayout, config: Any):
    """The model's class built from `config` on the meta device, in the model's dtype."""
    import torch

    previous = torch.get_default_dtype()
    try:
        if layout.dtype is not None and layout.dtype.is_floating_point:
            torch.set_default_dtype(layout.dtype)
        with torch.device("meta"):
            return tf.build_with_attention(layout.model_class, config, layout.attention)
    finally:
        torch.set_default_dtype(previous)


def build_replica(layout: GenLayout) -> tuple[Any, list, tuple[int, ...]]:
    """(replica, its decoder layers, the real index of each) in a fresh fake mode."""
    from llm_magic.predict.gen_layout import decoder_layers_and_path

    count = len(layout.layer_devices)
    for picks in (layout.picks, tuple(range(count))):
        config = _cut_config(layout.config, picks) if len(picks) < count else copy.deepcopy(layout.config)
        try:
            replica = _on_meta(layout, config)
            layers, path = decoder_layers_and_path(replica)
        except Exception:  # noqa: BLE001 - a cut config this family rejects: keep every layer
            if len(picks) == count:
                raise
            continue
        wanted = [layout.kind_shapes[layout.layer_kinds[index]] for index in picks]
        if [layer_shapes(layer) for layer in layers] == wanted:
            break
    else:
        raise RuntimeError("the model's class does not rebuild its decoder layers from its config")

    mode = gen_fake.fake_mode()
    to_real = {f"{path}.{position}.": f"{layout.layer_path}.{index}." for position, index in enumerate(picks)}

    def dtype_of(name: str, tensor: Any):
        for prefix, real in to_real.items():
            if name.startswith(prefix):
                name = real + name[len(prefix):]
                break
        return layout.param_dtypes.get(name, tensor.dtype)

    gen_fake.make_fake_parameters(replica, mode, dtype_of)
    replica.eval()
    replica.fake_mode = mode
    if layout.generation_config is not None:
        replica.generation_config = copy.deepcopy(layout.generation_config)
    return replica, list(layers), picks


class Simulator:
    """Fake generate steps of one model, at any batch and length; each shape is run once."""

    def __init__(self, layout: GenLayout) -> None:
        self.layout = layout
        self.replica, self.layers, self.picks = build_replica(layout)
        self._position = {pick: position for position, pick in enumerate(self.picks)}
        self._steps: dict[tuple, StepTrace] = {}
        self.runs = 0  # fake generate calls so far

    def trace_index(self, layer: int) -> int:
        """Which replica layer stands for real layer `layer`: itself if there, else the last of its kind."""
        if layer in self._position:
            return self._position[layer]
        kinds = self.layout.layer_kinds
        return max(position for position, pick in enumerate(self.picks) if kinds[pick] == kinds[layer])

    def prefill(self, batch: int, tokens: int, padded: bool, *, first_step: bool) -> tuple[StepTrace, ...]:
        """The prefill of `tokens` tokens, and with `first_step` the first decoding step after it."""
        key = ("prefill", batch, tokens, padded, first_step)
        if key not in self._steps:
            self._steps[key] = tuple(self._generate(batch, tokens, 2 if first_step else 1, padded))
        return self._steps[key]

    def decode(self, batch: int, cached: int, padded: bool) -> tuple[StepTrace, StepTrace]:
        """Decoding steps with `cached` and `cached + 1` tokens in the cache (sliding layers trimmed)."""
        key = ("decode", batch, cached, padded)
        if key not in self._steps:
            self._steps[key] = tuple(self._generate(batch, cached - 1, 4, padded)[2:4])
        return self._steps[key]

    def _generate(self, batch: int, prompt: int, new_tokens: int, padded: bool) -> list[StepTrace]:
        self.runs += 1
        cpu = self.layout.main_device == "cpu"
        steps = run_generate(self.replica, self.layers, batch=batch, prompt=prompt, new_tokens=new_tokens,
                             padded=padded, cpu=cpu)
        if len(steps) < new_tokens:
            raise RuntimeError(f"generate stopped after {len(steps)} of {new_tokens} steps")
        return steps
