"""On a CUDA device: the predicted peak of generate vs `torch.cuda.max_memory_allocated()`.

Skipped without CUDA (not run on the cpu-only machines this was written on); the benchmark
`benchmarks/bench_fit.py gpu` records the same comparison, and where a real OOM starts.
"""

from __future__ import annotations

import pytest
import torch
from support.realpeak import no_eos
from transformers import AutoConfig, AutoModelForCausalLM

from llm_magic.predict.generation import GenerationPredictor

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_predicted_peak_matches_cuda_max_memory_allocated(attention):
    config = AutoConfig.for_model("llama", vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    torch.manual_seed(0)
    model = no_eos(AutoModelForCausalLM.from_config(config, attn_implementation=attention)).to("cuda", torch.bfloat16)
    predictor = GenerationPredictor.for_model(model)
    for batch, tokens in [(1, 1024), (4, 2048)]:
        ids = torch.full((batch, tokens), 5, device="cuda")
        mask = torch.ones_like(ids)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        model.generate(ids, attention_mask=mask, max_new_tokens=8, pad_token_id=3)
        measured = torch.cuda.max_memory_allocated() - base
        predicted = predictor.peaks(batch, tokens, 8)["cuda:0"]
        assert abs(predicted - measured) <= 0.05 * measured, (attention, batch, tokens, predicted, measured)
