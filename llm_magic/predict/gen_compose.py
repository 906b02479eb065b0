"""Lay one traced step of the replica over the whole model: bytes per device at that step's peak.

The replica has one decoder layer per kind; the model has many, on one or more devices. Walking
the model's layers in order, each layer adds what its kind kept in the replica (the cache it
grew) to its device, and peaks there at its kind's transient on top of everything alive: the
cache of the steps before, the masks and rotary tables the prologue made (on the main device),
the hidden states, the layers before it. accelerate's hooks add copies where a layer runs on
another device than its inputs (the hidden states from the layer before, the masks and tables
from the main device) and, when its weights are offloaded, the largest submodule's weights, which
are there only while that submodule runs (see gen_layout._streamed_bytes).
The head runs on its device after the last layer.

Exact for a replica that is the whole model on one device (the tests check it against a fake
run of every layer); across devices the copies are the accelerate rule above.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable

from llm_magic.predict.gen_layout import GenLayout
from llm_magic.predict.gen_trace import StepTrace


def compose(layout: GenLayout, step: StepTrace, trace_index: Callable[[int], int]) -> dict[str, int]:
    """Most bytes (above the weights) held on each device during `step`, for the whole model."""
    main = layout.main_device
    traces = [step.layers[trace_index(layer)] for layer in range(len(layout.layer_devices))]
    resident: dict[str, int] = defaultdict(int)  # what stays for the whole step, per device
    for trace, device in zip(traces, layout.layer_devices):
        resident[device] += trace.held
    peak: dict[str, int] = defaultdict(int, resident)

    def at_least(device: str, nbytes: int) -> None:
        peak[device] = max(peak[device], nbytes)

    # What earlier steps left besides the cache (the previous step's output and logits, which
    # generate still holds during this forward; its token ids and mask), on the main device.
    resident[main] += step.start - sum(trace.held for trace in step.layers)
    at_least(main, resident[main] + step.prologue_peak - step.start + layout.streamed_other.get("embedding", 0))
    resident[main] += step.base
    hidden_device, hidden = main, traces[0].hidden
    for index, (trace, device) in enumerate(zip(traces, layout.layer_devices)):
        copies = layout.streamed_bytes[index]
        if hidden_device != device:
            copies += trace.hidden
            at_least(hidden_device, resident[hidden_device] + hidden)
        if main != device:
            copies += trace.others
        here = resident[device] + (trace.hidden if hidden_device == device else 0)
        at_least(device, here + copies + trace.transient)
        resident[device] += trace.kept
        if index == 0:
            resident[main] += step.kept_after_first
        hidden_device, hidden = device, trace.output

    last = traces[-1]
    head = layout.head_device
    # After the last layer its input and output are both alive; the head adds its own peak (and
    # its weights, while it runs, when they are offloaded).
    on_head = resident[head] + layout.streamed_other.get("head", 0) + (last.hidden + hidden if hidden_device == head else hidden)
    at_least(head, on_head + step.epilogue_peak - last.exit)
    if hidden_device != head:
        at_least(hidden_device, resident[hidden_device] + last.hidden + hidden)
    return dict(peak)
