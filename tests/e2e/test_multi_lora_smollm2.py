"""Multi-LoRA serving on the real SmolLM2-135M-Instruct (fp32) with two PEFT adapters of different ranks: one mixed
batch of base and adapter requests gives each request the greedy tokens of the engine running it alone and of PEFT's
merge_and_unload reference in transformers; no adapter shares another's prefix-cache blocks."""

import contextlib
import dataclasses

import pytest
import torch

from lmforge import LLM, SamplingParams
from lmforge.engine.lora_manager import LoRARequest
from lmforge.layers.attention import AttnMeta
from lmforge.layers.linear import AMX_MAX_ROWS
from lmforge.layers.multi_lora import NO_ADAPTER, LoraBatch
from tests.e2e.smollm2_adapters import NEW_TOKENS, QUESTIONS, chat_prompt, make_adapters, peft_references

pytest.importorskip("peft")
pytestmark = pytest.mark.e2e

GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def adapters(smollm2_dir, tmp_path_factory):
    return make_adapters(smollm2_dir, tmp_path_factory.mktemp("smollm2_adapters"))


@pytest.fixture(scope="module")
def llm(smollm2_dir, adapters):
    engine = LLM(str(smollm2_dir), dtype="float32", max_model_len=512, kv_cache_memory=0.3, enable_lora=True,
                 max_loras=2, max_lora_rank=16)
    for i, (name, path) in enumerate(adapters.items()):
        engine.add_lora(LoRARequest(name, i + 1, str(path)))
    return engine


def test_mixed_batch_equals_each_alone_and_peft_merged(llm, adapters, smollm2_dir):
    tok = llm.get_tokenizer()
    loaded = {a.name: a.request for a in llm.list_loras()}
    # every question under the base and both adapters, interleaved in one batch
    cases = [(chat_prompt(tok, q), name) for q in QUESTIONS for name in (None, *adapters)]
    prompts, names = [p for p, _ in cases], [n for _, n in cases]
    requests = [loaded[n] if n else None for n in names]
    mixed = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, lora_request=requests, use_tqdm=False)]
    assert all(len(t) == NEW_TOKENS for t in mixed)
    for prompt, request, got in zip(prompts, requests, mixed, strict=True):
        llm.reset_prefix_cache()
        assert llm.generate([prompt], GREEDY, lora_request=request, use_tqdm=False)[0].outputs[0].token_ids == got
    unique = [chat_prompt(tok, q) for q in QUESTIONS]
    refs = peft_references(smollm2_dir, adapters, unique)
    for (prompt, name), got in zip(cases, mixed, strict=True):
        assert got == refs[name][unique.index(prompt)], (name, tok.decode(prompt))
    for i in range(len(QUESTIONS)):  # each adapter really changes what the model says
        base, pirate, poet = mixed[3 * i: 3 * i + 3]
        assert base != pirate and base != poet and pirate != poet


def test_adapters_never_share_prefix_cache_blocks(llm):
    tok = llm.get_tokenizer()
    prompt = chat_prompt(tok, "Describe the sea in three sentences, please, with some detail about waves.")
    assert len(prompt) >= 32  # two full blocks of 16
    loaded = {a.name: a.request for a in llm.list_loras()}
    llm.reset_prefix_cache()

    def cached(name) -> int:
        return llm.generate([prompt], GREEDY, lora_request=loaded.get(name), use_tqdm=False)[0].num_cached_tokens

    full = (len(prompt) - 1) // 16 * 16
    assert [cached("pirate"), cached("poet"), cached(None), cached("pirate"), cached("poet"), cached(None)] == \
        [0, 0, 0, full, full, full]



def test_bf16_fast_paths_are_as_accurate_as_plain_pytorch(llm, smollm2_dir, adapters):
    """bf16 on CPU: the adapter products run on the packed-weight fast paths (AMX / oneDNN) beside the base ones.
    On one flat batch of base, pirate and poet sequences, their logits must be as close to the fp32 engine's as
    plain PyTorch bf16 (kernels off) is, and the adapters must still change them. (Greedy tokens are not compared:
    random adapters make near-ties that either bf16 path may break its own way.)"""
    from lmforge import hardware, kernels

    if kernels.cpu_ops() is None:
        pytest.skip("CPU kernels unavailable")
    if not hardware.bf16_support("cpu")[0]:
        pytest.skip("no packed bf16 fast path on a CPU without AVX512-BF16 or AMX (dtype auto runs float32 there)")
    bf16 = LLM(str(smollm2_dir), dtype="bfloat16", max_model_len=512, kv_cache_memory=0.1, enable_lora=True,
               max_loras=2, max_lora_rank=16)
    for adapter in llm.list_loras():
        bf16.add_lora(adapter.request)
    tok = llm.get_tokenizer()
    prompt = chat_prompt(tok, QUESTIONS[0])
    seqs = [prompt + out.outputs[0].token_ids[:8] for out in llm.generate([prompt] * 3, GREEDY, lora_request=[
        None, *[a.request for a in llm.list_loras()]], use_tqdm=False)]
    lens = [len(s) for s in seqs]
    assert sum(lens) <= AMX_MAX_ROWS  # one product per projection on the packed fast path

    def logits(engine, eager=False):
        slots = [NO_ADAPTER] + [a.slot for a in engine.list_loras()]
        meta = AttnMeta.for_sequences(lens)
        meta = dataclasses.replace(meta, lora=LoraBatch.build(slots, lens, torch.device("cpu")))
        model = engine.engine.model
        with torch.inference_mode(), engine.engine.runner.derived.active(), \
                kernels.disabled() if eager else contextlib.nullcontext():
            hidden = model(torch.tensor(sum(seqs, [])), torch.cat([torch.arange(n) for n in lens]), meta)
            return model.logits(hidden).split(lens)

    reference, fast, eager = logits(llm), logits(bf16), logits(bf16, eager=True)
    packs = bf16.engine.runner.derived.packs  # the fast path ran: the adapters' A and B were packed
    assert any(isinstance(key, tuple) and pack._packed is not None for key, pack in packs.items())
    errors = []
    for i in range(3):  # mean absolute logit error: max-abs is one outlier among 126 x 49152 logits
        errors.append((fast[i] - reference[i]).abs().mean().item())
        eager_error = (eager[i] - reference[i]).abs().mean().item()
        assert errors[-1] <= 1.25 * eager_error, (i, errors[-1], eager_error)
    n = len(prompt)  # the three sequences share the prompt: there, only the adapter differs
    assert min((fast[i][:n] - fast[0][:n]).abs().mean().item() for i in (1, 2)) > 5 * max(errors)
