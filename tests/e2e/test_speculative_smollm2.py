"""Speculative decoding (n-gram prompt lookup) on the real SmolLM2-135M-Instruct (fp32): 32 prompts decoded
together give, token for token, the greedy output of plain decoding."""

import pytest

from lmforge import LLM, SamplingParams
from tests.e2e.test_engine_smollm2 import assert_no_leak, chat_prompts

pytestmark = pytest.mark.e2e


def test_greedy_with_ngram_speculation_equals_plain_decoding(smollm2_dir):
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    plain = LLM(str(smollm2_dir), dtype="float32", max_model_len=1024, kv_cache_memory=0.5)
    prompts = chat_prompts(plain)
    want = [o.outputs[0].token_ids for o in plain.generate(prompts, params, use_tqdm=False)]
    del plain
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
    llm = LLM(str(smollm2_dir), dtype="float32", max_model_len=1024, kv_cache_memory=0.5, speculative_config=spec)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    stats = llm.engine.spec_stats
    assert stats.num_drafts > 100 and stats.accepted_per_pos[2] > 0, stats
    differ = [i for i, (g, w) in enumerate(zip(got, want, strict=True)) if g != w]
    assert not differ, f"{len(differ)} prompts differ, e.g. prompt {differ[0] if differ else None}"
    assert_no_leak(llm)
