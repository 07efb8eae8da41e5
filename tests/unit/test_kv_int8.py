"""int8 KV cache (kv_cache_dtype="int8"): the quantisation, the CPU kernels that write and read it against the torch
path, the engine on a tiny model against a float32 cache, step graphs over it, and the memory plan. And, float or
int8: no CPU path reads a pool slot before writing it."""

import logging
from types import SimpleNamespace

import pytest
import torch

from lmforge import LLM, SamplingParams, kernels
from lmforge.engine import model_runner
from lmforge.engine.config import EngineConfig
from lmforge.engine.model_runner import kv_bytes_per_block, plan_num_blocks
from lmforge.layers.attention import AttnMeta, attention
from lmforge.layers.kv_quant import dequantize_int8, quantize_int8
from tests.unit.test_kernels import BF16_ULP, reference_attention
from tests.unit.tiny_server import run as tiny_run
from tests.unit.tiny_server import tiny_chat_model

DTYPES = [torch.float32, torch.bfloat16]
needs_kernels = pytest.mark.skipif(kernels.cpu_ops() is None, reason="CPU kernels unavailable (no C++ compiler?)")


def test_quantisation_is_symmetric_absmax_rounded_to_nearest():
    torch.manual_seed(0)
    x = torch.randn(50, 3, 64) * torch.rand(50, 3, 1) * 10
    x[7, 1] = 0  # an all-zero row: scale 0, no division by zero
    q, scale = quantize_int8(x)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (50, 3)
    torch.testing.assert_close(scale, x.abs().amax(-1) / 127, rtol=0, atol=0)
    assert torch.equal(q[7, 1], torch.zeros(64, dtype=torch.int8)) and scale[7, 1] == 0
    assert q.abs().amax(-1)[scale > 0].eq(127).all()  # each row's largest magnitude maps to +-127
    err = (dequantize_int8(q, scale, torch.float32) - x).abs()
    assert (err <= scale[..., None] / 2 * (1 + 1e-6)).all()  # round to nearest: at most half a step off


def write_inputs(dtype, kv_heads=2, dim=64, tokens=11, slots=40):
    torch.manual_seed(1)
    fused = torch.randn(tokens, 3 * kv_heads * dim, dtype=dtype) * 3  # k and v as row-strided views, as in a model
    k = fused[:, kv_heads * dim: 2 * kv_heads * dim].view(tokens, kv_heads, dim)
    v = fused[:, 2 * kv_heads * dim:].view(tokens, kv_heads, dim)
    return k, v, torch.randperm(slots)[:tokens]


@needs_kernels
@pytest.mark.parametrize("level", kernels.levels())
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_write_equals_torch_quantisation(level, dtype):
    """write_kv into an int8 cache stores exactly what quantize_int8 computes: the same int8 rows, the same scales."""
    k, v, slots = write_inputs(dtype)
    caches = [torch.zeros(10, 4, 2, 64, dtype=torch.int8) for _ in range(2)] + \
             [torch.zeros(10, 4, 2) for _ in range(2)]
    with kernels.level(level) as ops:
        ops.write_kv(k, v, *caches[:2], slots, *caches[2:])
    for x, cache, scales in ((k, caches[0], caches[2]), (v, caches[1], caches[3])):
        q, s = quantize_int8(x)
        assert torch.equal(cache.view(-1, 2, 64)[slots], q)
        assert torch.equal(scales.view(-1, 2)[slots], s)
        untouched = torch.ones(40, dtype=torch.bool)
        untouched[slots] = False
        assert not cache.view(-1, 2, 64)[untouched].any() and not scales.view(-1, 2)[untouched].any()


@needs_kernels
def test_kernels_reject_an_int8_cache_without_scales():
    k, v, slots = write_inputs(torch.float32)
    cache = torch.zeros(10, 4, 2, 64, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="int8 cache needs float32 scales"):
        kernels.cpu_ops().write_kv(k, v, cache, cache.clone(), slots)
    with pytest.raises(RuntimeError, match="int8 cache needs float32 scales"):
        kernels.cpu_ops().write_kv(k, v, cache, cache.clone(), slots, torch.zeros(10, 4, 2, dtype=torch.float64),
                                   torch.zeros(10, 4, 2))


def mixed_step(dtype, dim, heads, kv_heads=2, bs=4):
    """Decodes, a 3-token chunk after a cache, a long prompt (SDPA), a short one; blocks shuffled; the int8 cache
    filled with quantised random rows."""
    torch.manual_seed(0)
    seqlens_q, seqlens_k = [1, 3, 90, 1, 9], [11, 7, 90, 1, 9]
    k_q, k_s = quantize_int8(torch.randn(200, bs, kv_heads, dim) * torch.rand(200, bs, kv_heads, 1) * 4)
    v_q, v_s = quantize_int8(torch.randn(200, bs, kv_heads, dim))
    tables = torch.randperm(200)[:5 * 23].view(5, 23)
    q = torch.randn(sum(seqlens_q), heads, dim, dtype=dtype)
    k_new = torch.randn(sum(seqlens_q), kv_heads, dim, dtype=dtype)
    v_new = torch.randn_like(k_new)
    new_positions = [torch.arange(lk - lq, lk) for lq, lk in zip(seqlens_q, seqlens_k, strict=True)]
    slots = torch.cat([tables[i, p // bs] * bs + p % bs for i, p in enumerate(new_positions)])
    meta = AttnMeta.for_paged(seqlens_q, seqlens_k, slots, tables, block_size=bs)
    return q, k_new, v_new, meta, (k_q, v_q, k_s, v_s)


@pytest.mark.parametrize("path", ["torch", *(kernels.levels() if kernels.cpu_ops() is not None else [])])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim,window,heads", [(64, None, 6), (64, 5, 6), (24, None, 6), (128, None, 4),
                                              (64, None, 10)])
@torch.inference_mode()
def test_paged_attention_over_int8_cache_matches_reference(path, dtype, dim, window, heads):
    """Each path (pure torch; the kernel of every level this CPU runs) writes the new rows quantised and attends over
    the dequantised cache: equal to plain float32 attention over the dequantised rows, within the tolerances of the
    float cache's kernel test. Rows that attend a prompt with nothing cached before it through SDPA use the new keys
    and values as computed (as vLLM does); every other row reads them back from the int8 cache."""
    with kernels.disabled() if path == "torch" else kernels.level(path):
        q, k_new, v_new, meta, kv = mixed_step(dtype, dim, heads)
    cache_before = [t.clone() for t in kv]
    if path == "torch":
        assert meta.decode.rows == (0, 3)  # the two decodes: one padded SDPA call over the dequantised blocks
        with kernels.disabled():
            out = attention(q, k_new, v_new, meta, kv, dim**-0.5, window)
        from_cache = {i for i, (lq, lk) in enumerate(zip(meta.seqlens_q, meta.seqlens_k, strict=True)) if lk > lq}
        if window is None:  # the batched decodes read the cache, a one-token prompt's own row too
            from_cache |= set(meta.decode.rows)
    else:
        with kernels.level(path):
            out = attention(q, k_new, v_new, meta, kv, dim**-0.5, window)
        assert meta.kernel.rows == (0, 1, 3, 4)
        from_cache = {0, 1, 3, 4}
    kv_heads, bs, start = k_new.shape[1], kv[0].shape[1], 0
    for i, (lq, lk) in enumerate(zip(meta.seqlens_q, meta.seqlens_k, strict=True)):
        pos = torch.arange(lk)
        slots = meta.block_tables[i, pos // bs] * bs + pos % bs
        keys, values = (dequantize_int8(kv[j].view(-1, kv_heads, dim)[slots], kv[j + 2].view(-1, kv_heads)[slots],
                                        torch.float32) for j in (0, 1))
        new_k_q, new_k_s = quantize_int8(k_new[start:start + lq])
        assert torch.equal(kv[0].view(-1, kv_heads, dim)[slots[lk - lq:]], new_k_q)  # written, quantised
        assert torch.equal(kv[2].view(-1, kv_heads)[slots[lk - lq:]], new_k_s)
        assert torch.equal(kv[0].view(-1, kv_heads, dim)[slots[:lk - lq]],  # earlier rows untouched
                           cache_before[0].view(-1, kv_heads, dim)[slots[:lk - lq]])
        if i not in from_cache:
            keys, values = k_new[start:start + lq].float(), v_new[start:start + lq].float()
        expected = reference_attention(q[start:start + lq], keys, values, lq, lk, dim**-0.5, window)
        if dtype == torch.float32:
            torch.testing.assert_close(out[start:start + lq], expected, atol=1e-5, rtol=1e-5)
        else:  # the torch path dequantises to bfloat16 before SDPA: one more rounding of the rows
            tol = BF16_ULP if path != "torch" else 2 * BF16_ULP
            torch.testing.assert_close(out[start:start + lq].float(), expected, atol=tol, rtol=tol)
        start += lq


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_chat_model(tmp_path_factory.mktemp("tiny"))


PROMPTS = [[1 + (i * 7 + j) % 90 for j in range(3 + 5 * i)] for i in range(6)]  # 3 to 28 tokens
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=0)


def tokens_and_logprobs(outs) -> list[tuple[list[int], list[float]]]:
    return [(list(o.outputs[0].token_ids), [d[t].logprob for d, t in zip(o.outputs[0].logprobs,
                                                                          o.outputs[0].token_ids, strict=True)])
            for o in outs]


def run(path, prompts=PROMPTS, params=GREEDY, **engine_args):
    llm = LLM(str(path), dtype="float32", kv_cache_memory=0.004, block_size=4, max_model_len=64, **engine_args)
    return llm, tokens_and_logprobs(llm.generate(prompts, params, use_tqdm=False))


def agreement(a, b):
    """Fraction of tokens generated identically before the first divergence, over all sequences; and the largest
    logprob difference of the chosen tokens up to and including the first divergence."""
    same = total = 0
    worst = 0.0
    for (ta, la), (tb, lb) in zip(a, b, strict=True):
        n = next((i for i, (x, y) in enumerate(zip(ta, tb, strict=True)) if x != y), len(ta))
        same, total = same + n, total + len(ta)
        worst = max([worst, *(abs(x - y) for x, y in zip(la[:n + 1], lb[:n + 1], strict=True))])
    return same / total, worst


@pytest.mark.parametrize("enforce_eager", [False, True], ids=["kernels", "eager"])
def test_int8_cache_generates_what_a_float32_cache_does(tiny_dir, enforce_eager):
    """Greedy decoding of a tiny random model, int8 KV against float32 KV: most tokens the same, the chosen tokens'
    logprobs close."""
    _, exact = run(tiny_dir, enforce_eager=enforce_eager)
    llm, int8 = run(tiny_dir, kv_cache_dtype="int8", enforce_eager=enforce_eager)
    assert llm.engine.runner.kv[0][0].dtype == torch.int8 and len(llm.engine.runner.kv[0]) == 4
    same, worst = agreement(exact, int8)
    assert same >= 0.9, same
    assert 0 < worst < 0.02, worst  # measured 0.003; 0 would mean the cache was not quantised
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_int8_cache_survives_preemption_and_prefix_caching(tiny_dir):
    """A pool too small for the batch (sequences preempted and recomputed) and shared prompt prefixes, on an int8
    cache: the tokens of a roomy int8 engine without prefix caching, every block freed."""
    shared = [5 + j % 80 for j in range(20)]
    prompts = [shared + [1 + i] for i in range(6)]
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, logprobs=0)
    big, roomy = run(tiny_dir, prompts, params, kv_cache_dtype="int8", enable_prefix_caching=False)
    per_block = kv_bytes_per_block(big.engine.model, 4, torch.int8)
    llm = LLM(str(tiny_dir), dtype="float32", kv_cache_memory=24 * per_block / 2**30, block_size=4,
              max_model_len=64, kv_cache_dtype="int8")  # 24 blocks for 6 sequences of 13
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert sum(o.metrics.num_preemptions for o in outs) > 0
    assert sum(o.num_cached_tokens for o in outs) > 0
    same, _ = agreement(roomy, [(list(o.outputs[0].token_ids), [0.0] * 30) for o in outs])
    assert same >= 0.9, same
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


@pytest.mark.parametrize("kv_dtype", ["auto", "int8"])
@pytest.mark.parametrize("enforce_eager", [False, True], ids=["kernels", "eager"])
def test_no_cpu_path_reads_a_pool_slot_before_writing_it(tiny_dir, monkeypatch, kv_dtype, enforce_eager):
    """A reused block's slots hold a former owner's keys and values, NaN included. A pool filled with NaN (int8 codes
    127, NaN scales): chunked prefills, prefix-cache hits and decodes give the tokens and log-probs of a zeroed one."""
    real = model_runner.kv_pool

    def filled(value):
        def pool(*args):
            layers = real(*args)
            for layer in layers:
                for t in layer:
                    t.fill_(127 if t.dtype == torch.int8 else value)
            return layers
        return pool

    shared = [5 + j % 80 for j in range(20)]
    prompts = [shared + [1 + i] for i in range(6)]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=0)
    results = []
    for value in (0.0, float("nan")):
        monkeypatch.setattr(model_runner, "kv_pool", filled(value))
        llm, out = run(tiny_dir, prompts[:1], params, kv_cache_dtype=kv_dtype, enforce_eager=enforce_eager,
                       max_num_batched_tokens=16)
        outs = llm.generate(prompts[1:], params, use_tqdm=False)  # their shared prefix is cached now
        assert sum(o.num_cached_tokens for o in outs) > 0
        results.append(out + tokens_and_logprobs(outs))
    assert results[1] == results[0]


@needs_kernels
@pytest.mark.parametrize("level", kernels.levels())
def test_step_graphs_replay_over_an_int8_cache(tiny_dir, level):
    """Decode steps replayed from a recording (scales recorded as part of the pool) equal the eager ones bit for
    bit."""
    with kernels.level(level):
        llm = LLM(str(tiny_dir), dtype="float32", kv_cache_memory=0.004, block_size=4, max_model_len=64,
                  enable_prefix_caching=False, kv_cache_dtype="int8")
        graphs = llm.engine.runner.graphs
        runner = llm.engine.runner
        runner.graphs = None
        eager = llm.generate(PROMPTS[:3], GREEDY, use_tqdm=False)
        runner.graphs = graphs
        replayed = llm.generate(PROMPTS[:3], GREEDY, use_tqdm=False)
    assert 3 in graphs.graphs and not graphs.eager
    assert graphs.replays >= 20
    for a, b in zip(eager, replayed, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert [d[t].logprob for d, t in zip(a.outputs[0].logprobs, a.outputs[0].token_ids, strict=True)] == \
               [d[t].logprob for d, t in zip(b.outputs[0].logprobs, b.outputs[0].token_ids, strict=True)]


def test_memory_plan_holds_more_int8_blocks(caplog):
    """head_dim 64 (SmolLM2): 68 bytes a row instead of 256 (float32) or 128 (bfloat16)."""
    model = SimpleNamespace(args=SimpleNamespace(num_hidden_layers=30, num_key_value_heads=3, head_dim=64))
    assert kv_bytes_per_block(model, 16, torch.int8) == 2 * 30 * 16 * 3 * (64 + 4)
    budget = 2**30
    with caplog.at_level(logging.INFO, logger="lmforge"):
        int8 = plan_num_blocks(model, 16, torch.int8, budget, 2048, model_dtype=torch.float32)
    assert "int8" in caplog.text and "3.76x the tokens of a float32 cache" in caplog.text
    fp32 = plan_num_blocks(model, 16, torch.float32, budget, 2048)
    bf16 = plan_num_blocks(model, 16, torch.bfloat16, budget, 2048)
    assert int8 == budget // (2 * 30 * 16 * 3 * 68)
    assert 3.7 < int8 / fp32 < 3.8 and 1.85 < int8 / bf16 < 1.9


def test_engine_pool_grows_with_int8(tiny_dir):
    fp32, _ = run(tiny_dir, prompts=PROMPTS[:1])
    int8, _ = run(tiny_dir, prompts=PROMPTS[:1], kv_cache_dtype="int8")
    head_dim = fp32.engine.model.args.head_dim  # 8 in the tiny model: 12 bytes a row instead of 32
    ratio = int8.engine.block_manager.num_blocks / fp32.engine.block_manager.num_blocks
    assert abs(ratio - 4 * head_dim / (head_dim + 4)) < 0.02


def test_unknown_kv_cache_dtype_is_one_clear_error():
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, int8, got 'fp8'"):
        EngineConfig(kv_cache_dtype="fp8")


def test_cli_flag(capsys):
    import argparse

    from lmforge.cli import main
    from lmforge.cli.engine_args import add_engine_args, engine_config

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    assert engine_config(parser.parse_args(["--kv-cache-dtype", "int8"])).kv_cache_dtype == "int8"
    assert engine_config(parser.parse_args([])).kv_cache_dtype == "auto"
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--kv-cache-dtype", "fp8", "hi"])
    assert exit_info.value.code == 2
    assert "argument --kv-cache-dtype: invalid choice: 'fp8'" in capsys.readouterr().err


def test_server_serves_over_an_int8_cache(tiny_dir):
    """The OpenAI server over an int8 cache: a greedy chat answer, whole and streamed, the same text."""
    from lmforge.engine.async_engine import AsyncEngine
    from lmforge.serve.openai_api import create_app
    from tests.unit.tiny_server import chat, events, request

    engine = AsyncEngine(model=str(tiny_dir), dtype="float32", kv_cache_memory=0.002, block_size=4,
                         kv_cache_dtype="int8")
    try:
        assert engine.engine.runner.kv[0][0].dtype == torch.int8
        app = create_app(engine, ["tiny"], model_root=str(tiny_dir))
        body = chat(max_tokens=6, ignore_eos=True, temperature=0)
        whole = tiny_run(request(app, "POST", "/v1/chat/completions", body)).json()
        streamed = events(tiny_run(request(app, "POST", "/v1/chat/completions", {**body, "stream": True})))
    finally:
        engine.shutdown()
    assert whole["usage"]["completion_tokens"] == 6
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in streamed[:-1])
    assert text == whole["choices"][0]["message"]["content"] and text


def test_multi_lora_over_an_int8_cache(tiny_dir, tmp_path):
    """Base and adapter requests in one batch over an int8 cache: each gets what it gets alone, the chosen tokens'
    logprobs are a float32 cache's up to the first divergence, and the adapter is applied."""
    pytest.importorskip("peft")
    from lmforge.engine.lora_manager import LoRARequest
    from tests.adapters import save_peft_adapter

    save_peft_adapter(tiny_dir, tmp_path / "a", r=4, lora_alpha=8, target_modules="all-linear", scale=0.3)
    adapter = LoRARequest("a", 1, str(tmp_path / "a"))
    prompts = [PROMPTS[3], PROMPTS[3], PROMPTS[5], PROMPTS[5]]
    requests = [None, adapter, None, adapter]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0)

    def chosen(outs):
        return [(list(o.outputs[0].token_ids), [d[t].logprob for d, t in zip(o.outputs[0].logprobs,
                                                                              o.outputs[0].token_ids, strict=True)])
                for o in outs]

    results = []
    for kv_cache_dtype in ("auto", "int8"):
        llm = LLM(str(tiny_dir), dtype="float32", kv_cache_memory=0.004, block_size=4, max_model_len=64,
                  enable_lora=True, max_loras=1, max_lora_rank=4, kv_cache_dtype=kv_cache_dtype)
        results.append(chosen(llm.generate(prompts, params, lora_request=requests, use_tqdm=False)))
    alone = [chosen(llm.generate([p], params, lora_request=r, use_tqdm=False))[0]
             for p, r in zip(prompts, requests, strict=True)]
    assert [t for t, _ in results[1]] == [t for t, _ in alone]
    _, worst = agreement(*results)
    assert worst < 0.02, worst
    assert results[1][0][0] != results[1][1][0] and results[1][2][0] != results[1][3][0]
