"""What the machine has, asked without changing anything (no CUDA context is created)."""

from __future__ import annotations

from llm_magic.engine.tensors import loaded_torch


def accelerator_present() -> bool:
    """Is there a CUDA device this process could use? (`is_available` asks the driver only.)

    The slow-tier warnings and highlights ask this one question: a model wholly on cpu next to
    an idle GPU is on a slow tier, even though the model itself has no accelerator row.
    """
    torch = loaded_torch()
    try:
        return bool(torch is not None and torch.cuda.is_available())
    except Exception:  # a broken driver install: no usable accelerator
        return False
