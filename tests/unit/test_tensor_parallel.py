"""Tensor parallelism (lmforge/engine/tensor_parallel.py): 2 processes of 1 thread give the greedy tokens of one
process, for each model family (tiny random models, fp32; mixtures of experts too), over shared memory and over gloo,
hold half the weights and KV bytes, refuse what they do not support with a message, and fail fast, naming the rank,
when a worker dies."""

import pytest
import torch

from lmforge import LLM, SamplingParams
from lmforge.engine import shm_comm, tensor_parallel
from lmforge.engine.model_runner import kv_bytes_per_block
from lmforge.engine.tensor_parallel import WorkerDied, share
from lmforge.errors import LmforgeError
from tests.tiny import write_tiny
from tests.tokenizer_refs import llama_style_dir
from tests.unit.test_live_engine import BASE, VOCAB
from tests.unit.test_live_engine import FAMILIES as LIVE_FAMILIES

FAMILIES = {  # q/k/v biases (qwen2), per-head norms (qwen3), fused qkv and gate/up (phi3), a shared expert (qwen2moe)
    **{name: LIVE_FAMILIES[name] for name in ("llama", "qwen2", "qwen3", "phi3", "qwen2moe")},
    # 3 KV heads over 2 ranks (2 and 1), a tied vocabulary of odd size (padded to equal slices)
    "llama-uneven": {**BASE, "hidden_size": 48, "num_attention_heads": 6, "num_key_value_heads": 3,
                     "vocab_size": VOCAB + 1, "tie_word_embeddings": True},
    "mixtral": {**LIVE_FAMILIES["mixtral"], "num_local_experts": 3},  # experts split 2 / 1, the router on both
}
PROMPTS = [[1 + (7 * i + 3 * j) % 500 for j in range(3 + 4 * i)] for i in range(6)]
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
ENGINE = dict(dtype="float32", kv_cache_memory=0.004, block_size=4, max_model_len=64)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # each rank runs this process's thread count
    yield
    torch.set_num_threads(threads)


def model_dir(tmp_path, config):
    llama_style_dir(tmp_path)
    return str(write_tiny(tmp_path, config))


def greedy(llm: LLM) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


def test_shares_split_as_evenly_as_they_go():
    assert [share(3, r, 2) for r in range(2)] == [(0, 2), (2, 3)]
    assert [share(8, r, 4) for r in range(4)] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert [share(5, r, 3) for r in range(3)] == [(0, 2), (2, 4), (4, 5)]


@pytest.mark.parametrize("family", [*FAMILIES, "llama-over-gloo"])
def test_two_ranks_give_one_process_greedy_tokens(tmp_path, family, monkeypatch):
    """Collectives through shared memory where the machine has them, gloo's own for "-over-gloo"."""
    if family.endswith("-over-gloo"):
        monkeypatch.setattr(shm_comm, "usable", lambda: False)
        family = family.removesuffix("-over-gloo")
    path = model_dir(tmp_path, FAMILIES[family])
    one = LLM(path, **ENGINE)
    expected = greedy(one)
    two = LLM(path, **ENGINE, tensor_parallel_size=2)
    try:
        assert (tensor_parallel._comm is not None) == shm_comm.usable()
        assert greedy(two) == expected
        if family == "llama":  # even shares: each rank holds half the weight and KV bytes (norms are replicated)
            held = two.engine.tp_workers.holdings(two.engine.model, two.engine.runner)
            blocks = two.engine.runner.kv[0][0].shape[0] / one.engine.runner.kv[0][0].shape[0]
            for rank in held:
                assert 0.49 < rank["weights"] / one.engine.weight_bytes < 0.51
                assert rank["kv"] == held[0]["kv"] and rank["kv"] / blocks * 2 == sum(
                    t.numel() * t.element_size() for layer in one.engine.runner.kv for t in layer)
            half = kv_bytes_per_block(two.engine.model, 4, torch.float32)
            assert half * 2 == kv_bytes_per_block(one.engine.model, 4, torch.float32)
    finally:
        two.engine.shutdown()
    assert all(not p.is_alive() for p in two.engine.tp_workers.procs)


def test_what_is_not_supported_is_refused_with_a_message(tmp_path):
    path = model_dir(tmp_path, BASE)
    for extra in ({"enable_lora": True}, {"quantization": "int8"},
                  {"speculative_config": {"method": "ngram", "num_speculative_tokens": 2}}):
        with pytest.raises(ValueError, match="tensor_parallel_size > 1 does not support"):
            LLM(path, **ENGINE, tensor_parallel_size=2, **extra)
    with pytest.raises(LmforgeError, match="exceeds the model's 2 KV heads"):
        LLM(path, **ENGINE, tensor_parallel_size=3)
    llm = LLM(path, **ENGINE, tensor_parallel_size=2)
    try:
        with pytest.raises(ValueError, match="prompt_logprobs"):
            llm.generate([[1, 2, 3]], SamplingParams(prompt_logprobs=1), use_tqdm=False)
        for call in (llm.engine.sleep, llm.engine.update_weights):
            with pytest.raises(RuntimeError, match="not supported with tensor_parallel_size"):
                call()
        assert greedy(llm)  # still serving after the refusals
    finally:
        llm.engine.shutdown()


def test_a_dead_worker_fails_the_next_step_naming_its_rank(tmp_path):
    llm = LLM(model_dir(tmp_path, BASE), **ENGINE, tensor_parallel_size=2)
    worker = llm.engine.tp_workers.procs[0]
    worker.kill()
    worker.join()
    with pytest.raises(WorkerDied, match=r"rank 1 \(exit code -9\) died"):
        llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    llm.engine.shutdown()  # returns at once: nobody left to tell
