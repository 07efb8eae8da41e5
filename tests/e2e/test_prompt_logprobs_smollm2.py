"""Prompt log-probs on the real SmolLM2-135M-Instruct (fp32): equal to the training forward's log-softmax of the prompt
tokens (1e-4), with the prefix cache on (and warm) and off, whole and under chunked prefill."""

import pytest
import torch

from lmforge import LLM, SamplingParams
from lmforge.layers.attention import AttnMeta

pytestmark = pytest.mark.e2e

TEXTS = ["The capital of France is Paris. The capital of Italy is Rome. The capital of Spain is",
         "Water boils at 100 degrees Celsius at sea level, and it freezes at",
         "The capital of France is Paris. The capital of Germany is Berlin."]


def reference(model, prompt: list[int]) -> torch.Tensor:
    """Each prompt token's log-prob under the training forward (autograd on: no inference fast path)."""
    with torch.enable_grad():
        hidden = model(torch.tensor(prompt), torch.arange(len(prompt)), AttnMeta.for_sequences([len(prompt)]))
        lp = torch.log_softmax(model.logits(hidden).detach().float(), -1)
    return lp[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]


@pytest.mark.parametrize("caching, budget", [(True, 8), (False, 2048)])
def test_prompt_logprobs_equal_the_training_forward(smollm2_dir, caching, budget):
    llm = LLM(str(smollm2_dir), dtype="float32", max_model_len=256, kv_cache_memory=0.05,
              enable_prefix_caching=caching, max_num_batched_tokens=budget)
    tok = llm.get_tokenizer()
    prompts = [tok.encode(t) for t in TEXTS]
    assert min(len(p) for p in prompts) > budget or budget > 256  # chunked prefill when the budget is small
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)  # warms the cache (if on)
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=5)
    for out in llm.generate(prompts, params, use_tqdm=False):
        prompt, scored = out.prompt_token_ids, out.prompt_logprobs
        assert out.num_cached_tokens == 0 and scored[0] is None and len(scored) == len(prompt)
        got = torch.tensor([scored[i][prompt[i]].logprob for i in range(1, len(prompt))])
        torch.testing.assert_close(got, reference(llm.engine.model, prompt), atol=1e-4, rtol=0)
        assert all(len(entry) in (5, 6) for entry in scored[1:])
        assert scored[-1][prompt[-1]].decoded_token == tok.decode([prompt[-1]], skip_special_tokens=False)
