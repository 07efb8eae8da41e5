"""Prompt log-probs (vLLM's prompt_logprobs) on a tiny random model: the training forward's log-softmax of the prompt
tokens, with the prefix cache on and off, under chunked prefill and preemption, with n > 1 and speculative decoding,
and without changing what the requests beside them generate."""

import pytest
import torch

from lmforge import LLM, SamplingParams
from lmforge.layers.attention import AttnMeta
from tests.unit.tiny_server import tiny_chat_model

PROMPTS = [[5, 9, 22, 40, 7, 3, 8, 100, 200, 13, 14, 15, 16, 17, 18, 19, 20, 21, 23], [3, 8, 100, 4, 77],
           [9, 9, 9, 12, 13, 14, 15, 9, 9, 9, 12, 13, 14, 15, 300, 301], [42, 43]]
K = 3


def reference(model, prompt: list[int]) -> torch.Tensor:
    """The training forward's log-softmax at positions 0 .. len - 2 (row i scores prompt token i + 1)."""
    with torch.enable_grad():  # autograd on: no inference fast path
        hidden = model(torch.tensor(prompt), torch.arange(len(prompt)), AttnMeta.for_sequences([len(prompt)]))
        logits = model.logits(hidden).detach()
    return torch.log_softmax(logits.float(), -1)[:-1]


def check(out, model, k: int = K) -> None:
    prompt, scored = out.prompt_token_ids, out.prompt_logprobs
    assert scored is not None and scored[0] is None and len(scored) == len(prompt)
    ref = reference(model, prompt)
    got = torch.tensor([scored[i][prompt[i]].logprob for i in range(1, len(prompt))])
    torch.testing.assert_close(got, ref[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])], atol=1e-4, rtol=0)
    for i in range(1, len(prompt)):
        entry, actual, row = scored[i], prompt[i], ref[i - 1]
        assert next(iter(entry)) == actual  # the actual token first, as vLLM orders them
        assert entry[actual].rank == int((row > row[actual]).sum()) + 1
        top = row.topk(k).indices.tolist()
        assert set(entry) == set(top) | {actual} and [entry[t].rank for t in top] == list(range(1, k + 1))
        assert all(isinstance(lp.decoded_token, str) for lp in entry.values())


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_chat_model(tmp_path_factory.mktemp("tiny_plp"))


def build(model_dir, **kwargs) -> LLM:
    return LLM(str(model_dir), **{"dtype": "float32", "kv_cache_memory": 0.002, "block_size": 4, **kwargs})


GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
SCORED = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, prompt_logprobs=K)


@pytest.mark.parametrize("caching, budget", [(True, 4096), (False, 4096), (True, 8), (False, 7)])
def test_prompt_logprobs_equal_the_training_forward(model_dir, caching, budget):
    llm = build(model_dir, enable_prefix_caching=caching, max_num_batched_tokens=budget)
    scored = llm.generate(PROMPTS, SCORED, use_tqdm=False)
    plain = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert plain[0].num_cached_tokens == (16 if caching else 0)  # the scoring request published its blocks
    again = llm.generate(PROMPTS, SCORED, use_tqdm=False)  # the cache is warm, yet every position is computed
    for first, before, out in zip(scored, plain, again, strict=True):
        check(first, llm.engine.model)
        check(out, llm.engine.model)
        assert out.num_cached_tokens == 0 and before.prompt_logprobs is None
        assert out.outputs[0].token_ids == first.outputs[0].token_ids == before.outputs[0].token_ids


def test_prompt_logprobs_beside_other_requests_n_and_one_token_prompts(model_dir):
    llm = build(model_dir, max_num_batched_tokens=10)
    params = [SCORED, GREEDY, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, prompt_logprobs=0, n=2),
              SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, prompt_logprobs=1)]
    outs = llm.generate(PROMPTS[:3] + [[17]], params, use_tqdm=False)
    check(outs[0], llm.engine.model)
    assert outs[1].prompt_logprobs is None
    check(outs[2], llm.engine.model, k=0)
    assert all(len(entry) == 1 for entry in outs[2].prompt_logprobs[1:])  # k = 0: the actual token only
    assert outs[3].prompt_logprobs == [None]
    alone = [llm.generate([p], GREEDY, use_tqdm=False)[0].outputs[0].token_ids for p in PROMPTS[:3]]
    assert [o.outputs[0].token_ids for o in outs[:3]] == alone
    assert outs[2].outputs[0].token_ids == outs[2].outputs[1].token_ids


def test_prompt_logprobs_survive_preemption_mid_prefill(model_dir):
    # 24 blocks of 4 tokens for 8 sequences of up to 46 tokens, prefilled 6 tokens a step: the newest, still
    # prefilling, are preempted and score their prompts again when they come back
    per_block = 2 * 2 * 4 * 2 * 8 * 4  # k and v x layers x block_size x kv heads x head_dim x fp32
    llm = build(model_dir, max_model_len=64, max_num_batched_tokens=6, kv_cache_memory=24 * per_block / 2**30)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, prompt_logprobs=2)
    outs = llm.generate(PROMPTS[:3] * 2 + [PROMPTS[0][::-1], PROMPTS[2][::-1]], params, use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0
    for out in outs:
        check(out, llm.engine.model, k=2)


def test_prompt_logprobs_under_speculative_decoding(model_dir):
    llm = build(model_dir, speculative_config={"method": "ngram", "num_speculative_tokens": 3})
    outs = llm.generate(PROMPTS, SCORED, use_tqdm=False)
    for out in outs:
        check(out, llm.engine.model)
    plain = build(model_dir).generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in plain]
