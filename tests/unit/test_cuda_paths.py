"""The CUDA paths' logic on the CPU (issue 23; tests/gpu/ proves them on a GPU): the fixed-shape decode attention
that CUDA graphs replay gives the engine's greedy tokens, with its static buffers, padding rows, scratch slot and
table widths exercised through the same `DecodeGraphs` whose capture is swapped for an eager run; a whole step's
paged attention through FlexAttention's mask over the pool (its unfused reference here) equals per-sequence SDPA and
gives the engine's tokens, shared prefix blocks and sliding windows included, and packed training documents through
it (shared prompts too) give the SDPA path's outputs; and the KV budget planned from the
GPU's memory (gpu_memory_utilization), with its error when nothing is left."""

import pytest
import torch
import torch.nn.functional as F

from lmforge import LLM, SamplingParams
from lmforge.engine import config as engine_config
from lmforge.engine.config import EngineConfig, kv_budget_bytes, step_activation_bytes
from lmforge.engine.cuda_graph import DecodeGraphs, graph_sizes
from lmforge.errors import LmforgeError
from lmforge.layers import flex
from lmforge.layers.attention import AttnMeta, attention
from tests.tiny import write_tiny
from tests.tokenizer_refs import llama_style_dir
from tests.unit.test_live_engine import BASE
from tests.unit.test_live_engine import FAMILIES as LIVE_FAMILIES

FAMILIES = {
    "llama": BASE,
    "llama-window": {**BASE, "sliding_window": 6},  # every layer attends to its last 6 keys only
    "qwen3": LIVE_FAMILIES["qwen3"],
    "phi3": LIVE_FAMILIES["phi3"],
}
ENGINE = dict(dtype="float32", kv_cache_memory=0.004, block_size=4, max_model_len=64, max_num_seqs=8)


class EagerGraphs(DecodeGraphs):
    """DecodeGraphs whose "capture" runs the forward over the static buffers eagerly at each replay: everything
    but the CUDA graph itself (buffers, padding, widths, the static attention) runs as on a GPU."""

    def capture(self, b: int, width: int):
        self.captured.append((b, width))
        return lambda: self.forward(b, width)


def test_graph_sizes_are_vllms():
    assert graph_sizes(1) == [1]
    assert graph_sizes(8) == [1, 2, 4, 8]
    assert graph_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert graph_sizes(256)[:6] == [1, 2, 4, 8, 16, 24] and graph_sizes(256)[-1] == 256


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fixed_shape_decode_steps_give_the_engines_greedy_tokens(tmp_path, family):
    llama_style_dir(tmp_path)
    path = str(write_tiny(tmp_path, FAMILIES[family]))
    prompts = [[1 + (7 * i + 3 * j) % 500 for j in range(3 + 5 * i)] for i in range(6)]
    params = [SamplingParams(temperature=0, max_tokens=6 + 5 * i, ignore_eos=True) for i in range(6)]
    expected = [o.outputs[0].token_ids for o in LLM(path, **ENGINE).generate(prompts, params, use_tqdm=False)]
    llm = LLM(path, **ENGINE)
    runner = llm.engine.runner
    runner.kv_shape = (runner.kv_shape[0] + 1, *runner.kv_shape[1:])  # the scratch block a CUDA pool has
    runner.step_graphs = False
    runner.release()
    runner.allocate()
    graphs = runner.cuda_graphs = EagerGraphs(runner.model, runner.kv, 8, runner.max_blocks, runner.scratch_slot)
    graphs.captured = []
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert got == expected
    # the batch shrank from 6 to 1 sequence (padded to 8, 4, 2, 1) while the longest context grew past 8 blocks
    assert {b for b, _ in graphs.captured} == {8, 4, 2, 1}
    assert len({w for _, w in graphs.captured}) >= 2 and all(w & (w - 1) == 0 for _, w in graphs.captured)


def test_the_kv_budget_is_what_gpu_memory_utilization_leaves(monkeypatch):
    gib = 2**30
    monkeypatch.setattr(engine_config.torch.cuda, "mem_get_info", lambda device: (70 * gib, 80 * gib))
    cuda = torch.device("cuda", 0)
    # 90 % of 80 GiB = 72, less the 10 in use and a step's 1
    assert kv_budget_bytes(EngineConfig(), cuda, step_bytes=gib) == 61 * gib
    assert kv_budget_bytes(EngineConfig(gpu_memory_utilization=0.5), cuda) == 30 * gib
    assert kv_budget_bytes(EngineConfig(kv_cache_memory=3), cuda) == 3 * gib  # stated memory wins
    assert kv_budget_bytes(EngineConfig(), torch.device("cpu")) == 2 * gib
    with pytest.raises(LmforgeError, match="no GPU memory is left for the KV cache: 12% of 80.0 GiB"):
        kv_budget_bytes(EngineConfig(gpu_memory_utilization=0.12), cuda)
    with pytest.raises(ValueError, match="gpu_memory_utilization must be in"):
        EngineConfig(gpu_memory_utilization=1.5)


def test_a_steps_activation_bound_grows_with_its_tokens_and_sequences():
    from lmforge.models import build_args

    _, args = build_args(BASE)
    small = step_activation_bytes(args, EngineConfig(max_num_batched_tokens=512, max_num_seqs=8), torch.bfloat16)
    large = step_activation_bytes(args, EngineConfig(max_num_batched_tokens=4096, max_num_seqs=8), torch.bfloat16)
    assert 0 < small < large
    assert step_activation_bytes(args, EngineConfig(max_num_seqs=256), torch.float32) > \
        step_activation_bytes(args, EngineConfig(max_num_seqs=8), torch.float32)


@pytest.mark.parametrize("window", [None, 5])
def test_a_steps_flex_attention_over_the_pool_equals_each_sequence_alone(window):
    """Three sequences in one step: a 7-token prompt chunk after 5 cached tokens, a decode after 9, a fresh
    6-token prompt; the first two share their first block (a prefix-cache hit); 6 query / 2 KV heads."""
    torch.manual_seed(0)
    bs, blocks, kvh, heads, dim = 4, 12, 2, 6, 8
    k_cache, v_cache = torch.randn(blocks, bs, kvh, dim), torch.randn(blocks, bs, kvh, dim)
    tables = torch.tensor([[3, 5, 7, 0], [3, 9, 2, 0], [6, 4, 0, 0]])
    seqlens_q, seqlens_k = [7, 1, 6], [12, 10, 6]
    q = torch.randn(sum(seqlens_q), heads, dim)
    step = flex.FlexStep.build(seqlens_q, seqlens_k, tables, blocks, bs)
    got = flex.flex_paged_attention(q, k_cache, v_cache, step, 0.3, window)
    start = 0
    for i, (lq, lk) in enumerate(zip(seqlens_q, seqlens_k, strict=True)):
        keys = k_cache[tables[i]].flatten(0, 1)[:lk].repeat_interleave(heads // kvh, 1)
        values = v_cache[tables[i]].flatten(0, 1)[:lk].repeat_interleave(heads // kvh, 1)
        pos_q, pos_k = torch.arange(lk - lq, lk)[:, None], torch.arange(lk)[None, :]
        allowed = (pos_k <= pos_q) & ((pos_q - pos_k < window) if window else True)
        want = F.scaled_dot_product_attention(q[start:start + lq].transpose(0, 1), keys.transpose(0, 1),
                                              values.transpose(0, 1), attn_mask=allowed, scale=0.3).transpose(0, 1)
        torch.testing.assert_close(got[start:start + lq], want, rtol=1e-5, atol=1e-5)
        start += lq


@pytest.mark.parametrize("family", ["llama", "llama-window", "qwen3"])
def test_engine_steps_through_flex_attention_give_the_engines_greedy_tokens(tmp_path, family, monkeypatch):
    """The engine with FlexAttention serving its paged steps (as on CUDA; kernels off): chunked prefill, decode and
    prompts sharing a cached prefix give the default engine's greedy tokens."""
    llama_style_dir(tmp_path)
    path = str(write_tiny(tmp_path, FAMILIES[family]))
    shared = [9, 8, 7, 6, 5, 4, 3, 2]
    prompts = [shared + [1 + (7 * i + 3 * j) % 500 for j in range(2 + 4 * i)] for i in range(5)]
    engine = dict(ENGINE, kv_cache_memory=0.001, max_num_batched_tokens=16)  # long prompts prefill in chunks
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)

    def run(llm: LLM) -> list[list[int]]:  # the first prompt alone, then all: the others find its prefix cached
        first = llm.generate(prompts[:1], params, use_tqdm=False)
        return [o.outputs[0].token_ids for o in first + llm.generate(prompts[1:], params, use_tqdm=False)]

    expected = run(LLM(path, **engine))
    monkeypatch.setattr(flex, "DEVICES", ("cpu", "cuda"))
    llm = LLM(path, **engine, enforce_eager=True)
    calls = []
    original = flex.flex_paged_attention
    monkeypatch.setattr(flex, "flex_paged_attention", lambda *a: calls.append(1) or original(*a))
    assert run(llm) == expected
    assert calls and llm.engine.block_manager.prefix_hits > 0


@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("prefixed", [False, True])
def test_packed_documents_through_flex_attention_equal_sdpa(monkeypatch, window, prefixed):
    """Four packed documents (with prefixes: the second and third read the first's first 3 and 5 tokens, a GRPO
    group's shared prompt; the fourth stands alone) give the SDPA path's outputs. (FlexAttention has no backward on
    the CPU: tests/gpu/ compares the gradients.)"""
    torch.manual_seed(0)
    cu = torch.tensor([0, 6, 10, 13, 18])
    prefixes = torch.tensor([0, 3, 5, 0]) if prefixed else None
    q, k, v = torch.randn(18, 6, 8), torch.randn(18, 2, 8), torch.randn(18, 2, 8)
    want = attention(q, k, v, AttnMeta.for_training(cu, prefixes), None, 0.3, window)
    monkeypatch.setattr(flex, "DEVICES", ("cpu", "cuda"))
    meta = AttnMeta.for_training(cu, prefixes)
    assert isinstance(meta.flex, flex.FlexDocs)
    torch.testing.assert_close(attention(q, k, v, meta, None, 0.3, window), want, rtol=1e-5, atol=1e-5)


def test_a_nan_left_in_the_pool_reaches_no_other_sequence_through_flex_attention(monkeypatch):
    """A former owner's NaN in a slot that shares a 128-slot tile with a sequence's blocks: the engine's flex path
    writes only finite keys and values, so the step's outputs stay finite; without that, the NaN would spread."""
    monkeypatch.setattr(flex, "DEVICES", ("cpu", "cuda"))
    torch.manual_seed(0)
    k_cache, v_cache = torch.zeros(8, 4, 2, 8), torch.zeros(8, 4, 2, 8)
    v_cache[5, 3] = float("nan")  # a freed block's slot, never in this step's tables
    tables = torch.tensor([[1, 2]])
    meta = AttnMeta.for_paged([6], [6], torch.arange(4, 10), tables, block_size=4, num_blocks=8)
    q, k, v = torch.randn(6, 4, 8), torch.randn(6, 2, 8), torch.randn(6, 2, 8)
    assert isinstance(meta.flex, flex.FlexStep)
    raw = flex.flex_paged_attention(q, k_cache, v_cache, meta.flex, 0.3, None)
    assert raw.isnan().any()  # FlexAttention itself lets the stale NaN through the tile
    v_cache[5, 3] = 0.0
    nan_k = k.clone()
    nan_k[2, 0, 0] = float("nan")  # this step writes a NaN key: stored as a finite number
    out = attention(q, nan_k, v, meta, (k_cache, v_cache), 0.3)
    assert k_cache.isfinite().all() and out.isfinite().all()
