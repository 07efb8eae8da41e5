"""Tensor parallelism on the real SmolLM2-135M-Instruct (fp32): 2 gloo processes of 1 thread give, token for token, the
greedy output of one process for 32 chat prompts x 64 tokens. SmolLM2's 3 KV heads split unevenly (2 and 1)."""

import pytest
import torch

from lmforge import LLM, SamplingParams
from tests.e2e.test_engine_smollm2 import chat_prompts

pytestmark = pytest.mark.e2e


def test_two_ranks_give_one_process_greedy_tokens(smollm2_dir):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
        one = LLM(str(smollm2_dir), dtype="float32", max_model_len=1024, kv_cache_memory=0.5)
        prompts = chat_prompts(one)
        assert len(prompts) == 32
        want = [o.outputs[0].token_ids for o in one.generate(prompts, params, use_tqdm=False)]
        del one
        two = LLM(str(smollm2_dir), dtype="float32", max_model_len=1024, kv_cache_memory=0.5, tensor_parallel_size=2)
        try:
            got = [o.outputs[0].token_ids for o in two.generate(prompts, params, use_tqdm=False)]
        finally:
            two.engine.shutdown()
    finally:
        torch.set_num_threads(threads)
    differ = [i for i, (g, w) in enumerate(zip(got, want, strict=True)) if g != w]
    assert not differ, f"{len(differ)} prompts differ, e.g. prompt {differ[0] if differ else None}"
