"""Multi-LoRA serving on a tiny random Llama (fp32) with adapters made by PEFT: a mixed batch (base + two adapters of
different ranks) gives each request what it gets alone and what PEFT's merged model generates; adapters never share
prefix-cache blocks; load/unload at run time; every unfit adapter fails loudly at load, leaving the engine as it was."""

import json

import pytest
import torch

from lmforge import LLM, SamplingParams, kernels
from lmforge.engine.lora_manager import AdapterInUseError, AdapterLimitError, AdapterNotFoundError, LoRARequest
from lmforge.errors import LmforgeError
from lmforge.layers.linear import DerivedWeights, Linear, fuse, linears
from lmforge.layers.multi_lora import NO_ADAPTER, LoraBatch, MultiLoRALinear
from tests.adapters import save_peft_adapter
from tests.tiny import TINY_LLAMA, write_tiny
from tests.unit.tiny_server import tiny_chat_model

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
PROMPTS = [[1, 5, 9, 22, 40, 7], [3, 8, 100], [1, 5, 9, 22, 40, 7], [9, 9, 9, 9, 9, 12, 13], [1, 5, 9, 22, 40, 7]]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_chat_model(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory):
    """Two PEFT adapters: rank 4 on q/v, and rank 8 rsLoRA on every linear layer; their PEFT models, merged."""
    root = tmp_path_factory.mktemp("adapters")
    a = save_peft_adapter(base, root / "a", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    b = save_peft_adapter(base, root / "b", seed=2, r=8, lora_alpha=4, target_modules="all-linear", use_rslora=True)
    return {"a": (LoRARequest("a", 1, str(root / "a")), a.merge_and_unload()),
            "b": (LoRARequest("b", 2, str(root / "b")), b.merge_and_unload())}


@pytest.fixture(scope="module")
def llm(base, adapters):
    engine = LLM(str(base), dtype="float32", kv_cache_memory=0.002, block_size=4, enable_lora=True, max_loras=2,
                 max_lora_rank=8)
    for request, _ in adapters.values():
        engine.add_lora(request)
    return engine


@pytest.fixture(scope="module")
def spare(base, adapters):
    """An engine with a free slot (only `a` loaded): loads that fail are refused for the adapter, not the limit."""
    engine = LLM(str(base), dtype="float32", kv_cache_memory=0.002, block_size=4, enable_lora=True, max_loras=2,
                 max_lora_rank=8)
    engine.add_lora(adapters["a"][0])
    return engine


def tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def batch(slots, seqlens):
    return LoraBatch.build(slots, seqlens, torch.device("cpu"))


def test_lora_batch_selects_each_slots_rows():
    assert batch([NO_ADAPTER, NO_ADAPTER], [3, 1]) is None
    lora = batch([0, 0, NO_ADAPTER, 2, 0], [2, 3, 1, 2, 1])
    assert lora.slots == {0, 2}
    assert lora.rows[0].tolist() == [0, 1, 2, 3, 4, 8] and lora.rows[2] == slice(6, 8)  # runs end to end: a slice


def test_multi_lora_linear_is_base_plus_each_tokens_adapter():
    torch.manual_seed(0)
    layers = [Linear(16, n) for n in (24, 8, 8)]
    derived = DerivedWeights({layers[0]: fuse(*layers)})  # the bases' joint product: wrapped layers share it
    wrapped = [MultiLoRALinear(layer, max_loras=3, max_rank=4) for layer in layers]
    factors = {}
    for i, layer in enumerate(wrapped):
        for slot, rank in ((0, 4), (2, 2)):
            a, b = torch.randn(rank, 16), torch.randn(layer.out_features, rank)
            layer.set_slot(slot, a, b, scaling=0.5)
            factors[i, slot] = (a, b)
    x = torch.randn(7, 16)
    lora = batch([2, 0, NO_ADAPTER, 2], [1, 2, 3, 1])
    per_token = [2, 0, 0, NO_ADAPTER, NO_ADAPTER, NO_ADAPTER, 2]
    with derived.active():
        outs = linears(x, *wrapped, lora=lora)
    for i, out in enumerate(outs):
        expected = layers[i](x)
        for t, slot in enumerate(per_token):
            if slot != NO_ADAPTER:
                a, b = factors[i, slot]
                expected[t] += 0.5 * (b @ (a @ x[t]))
        torch.testing.assert_close(out, expected)
        torch.testing.assert_close(wrapped[i](x, lora), expected)
    with pytest.raises(TypeError):  # no default: a model file that forgets to pass the batch fails loudly
        wrapped[0](x)


def test_a_slot_holding_nan_reaches_only_its_own_rows():
    """Rows are selected per slot, never masked: a 0/1 mask would carry a NaN of any slot into every row
    (0 * NaN = NaN), so one bad adapter, even unused, would corrupt the whole batch."""
    torch.manual_seed(0)
    layer = MultiLoRALinear(Linear(16, 24), max_loras=3, max_rank=4)
    a, b = torch.randn(4, 16), torch.randn(24, 4)
    layer.set_slot(0, a, b, scaling=0.5)
    layer.set_slot(2, torch.randn(2, 16), torch.randn(24, 2), scaling=0.5)
    with pytest.raises(ValueError, match="not all finite"):
        layer.set_slot(1, torch.full((4, 16), float("nan")), b, scaling=0.5)
    assert layer.ranks[1] == 0 and not layer.lora_a[1].any()
    with pytest.raises(ValueError, match="not all finite"):  # finite in fp32, infinite once scaled
        layer.set_slot(1, a, torch.full((24, 4), 3e38), scaling=16.0)
    layer.lora_a[2].fill_(float("nan"))  # poked past the check
    layer.lora_b[2].fill_(float("inf"))
    x = torch.randn(6, 16)
    out = layer(x, batch([0, NO_ADAPTER, 2, 0], [2, 1, 2, 1]))
    expected = layer.base_layer(x)
    expected[[0, 1, 5]] += 0.5 * x[[0, 1, 5]] @ a.T @ b.T
    torch.testing.assert_close(out[[0, 1, 2, 5]], expected[[0, 1, 2, 5]])
    assert out[3:5].isnan().all()  # the poisoned slot's own rows only
    out = layer(x, batch([0, NO_ADAPTER, 0], [2, 1, 3]))  # loaded but unused: no effect at all
    assert out.isfinite().all()


def test_an_adapter_file_holding_nan_is_refused(spare, base, tmp_path):
    from safetensors.torch import load_file, save_file

    save_peft_adapter(base, tmp_path / "nan", r=4, target_modules=["q_proj"])
    weights = tmp_path / "nan" / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = sorted(tensors)[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, weights)
    with pytest.raises(LmforgeError, match=f"{key}' holds NaN or infinite values; the adapter is damaged"):
        spare.add_lora(LoRARequest("nan", 9, str(tmp_path / "nan")))
    assert [a.name for a in spare.list_loras()] == ["a"]


@pytest.mark.skipif(kernels.cpu_ops() is None, reason="CPU kernels unavailable (no C++ compiler?)")
@pytest.mark.parametrize("rows", [2, 9, 130])  # the streaming kernel, packed weights (AMX / oneDNN), F.linear
def test_bf16_fast_paths_follow_slot_changes(rows):
    """In bf16 the adapter products take Linear's fast paths over packed copies of the slot matrices: a slot loaded
    or cleared after a step has packed them must be what the next step computes."""
    torch.manual_seed(0)
    layer = MultiLoRALinear(Linear(64, 96).to(torch.bfloat16), max_loras=2, max_rank=16)
    x = torch.randn(rows, 64, dtype=torch.bfloat16)
    factors = {0: (0.3 * torch.randn(8, 64), 0.3 * torch.randn(96, 8)),
               1: (0.3 * torch.randn(4, 64), 0.3 * torch.randn(96, 4))}  # two ranks below max_rank
    lora = batch([0, NO_ADAPTER, 1], [rows // 2, 1, rows - rows // 2 - 1])
    rows_of = {0: slice(0, rows // 2), 1: slice(rows // 2 + 1, rows)}
    base = layer.base_layer(x).float()
    for slot, load, loaded in ((0, True, (0,)), (1, True, (0, 1)), (0, False, (1,))):  # each after a packed step
        if load:
            layer.set_slot(slot, *factors[slot], scaling=0.5)
        else:
            layer.clear_slot(slot)
        expected = base.clone()
        for s in loaded:
            a, b = factors[s]
            expected[rows_of[s]] += 0.5 * x[rows_of[s]].float() @ a.T @ b.T
        with torch.inference_mode():
            torch.testing.assert_close(layer(x, lora).float(), expected, atol=0.1, rtol=0.02)


def test_mixed_batch_equals_each_alone_and_peft_merged(llm, adapters):
    requests = [None, adapters["a"][0], adapters["a"][0], adapters["b"][0], adapters["b"][0]]
    mixed = tokens(llm.generate(PROMPTS, GREEDY, lora_request=requests, use_tqdm=False))
    alone = [tokens(llm.generate([p], GREEDY, lora_request=r, use_tqdm=False))[0]
             for p, r in zip(PROMPTS, requests, strict=True)]
    assert mixed == alone
    base = transformers.LlamaForCausalLM.from_pretrained(llm.engine.config.model, dtype=torch.float32)
    references = {None: base.eval()}
    references.update({name: merged for name, (_, merged) in adapters.items()})
    for prompt, request, got in zip(PROMPTS, requests, mixed, strict=True):
        ref = references[request.lora_name if request else None]
        ref.generation_config.eos_token_id = None  # as ignore_eos: generate through EOS
        with torch.no_grad():
            out = ref.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert out[0, len(prompt):].tolist() == got, request
    # the same prompt under the base, a and b: three different continuations (each adapter is really applied)
    assert len({tuple(mixed[0]), tuple(mixed[2]), tuple(mixed[4])}) == 3


def test_chunked_prefill_and_preemption_keep_each_requests_adapter(llm, base, adapters):
    """A 5-token budget splits prompts over steps that mix chunks and decodes of different adapters, and a tiny KV
    pool forces preemption: every request still gets what it gets alone."""
    requests = [None, adapters["a"][0], adapters["b"][0], adapters["a"][0], adapters["b"][0]]
    expected = tokens(llm.generate(PROMPTS, GREEDY, lora_request=requests, use_tqdm=False))
    block = 2 * 2 * 4 * 2 * 8 * 4  # k and v, 2 layers, 4 tokens, 2 kv heads of 8, fp32
    tight = LLM(str(base), dtype="float32", kv_cache_memory=10 * block / 2**30, block_size=4, max_model_len=16,
                max_num_batched_tokens=5, enable_lora=True, max_loras=2, max_lora_rank=8)  # 10 blocks, 5 x 4 needed
    assert tokens(tight.generate(PROMPTS, GREEDY, lora_request=requests, use_tqdm=False)) == expected
    assert tight.engine.scheduler.num_preemptions > 0


def test_prefix_cache_is_never_shared_across_adapters(llm, adapters):
    prompt = [2, 4, 6, 8, 10, 12, 14, 16, 18]  # two full blocks of 4
    ra, rb = adapters["a"][0], adapters["b"][0]

    def cached(request) -> int:
        return llm.generate([prompt], GREEDY, lora_request=request, use_tqdm=False)[0].num_cached_tokens

    assert [cached(ra), cached(ra), cached(rb), cached(None), cached(rb), cached(None)] == [0, 8, 0, 0, 8, 8]


def test_unload_refused_while_in_flight_then_reload(llm, adapters):
    ra, rb = adapters["a"][0], adapters["b"][0]
    before = tokens(llm.generate([PROMPTS[3]], GREEDY, lora_request=rb, use_tqdm=False))
    engine = llm.engine
    engine.add_request("busy", PROMPTS[3], GREEDY, lora_request=rb)
    with pytest.raises(AdapterInUseError, match="'b' has 1 requests in flight"):
        llm.remove_lora("b")
    with pytest.raises(AdapterLimitError, match="max_loras=2 adapters are already loaded"):
        llm.add_lora(LoRARequest("c", 3, ra.lora_path))
    engine.abort("busy")
    uid = engine.loras.get("b").uid
    assert llm.remove_lora("b").name == "b" and [a.name for a in llm.list_loras()] == ["a"]
    with pytest.raises(AdapterNotFoundError, match="no LoRA adapter named 'b'"):
        llm.remove_lora("b")
    with pytest.raises(AdapterNotFoundError, match="'b' is not loaded"):
        engine.add_request("gone", PROMPTS[3], GREEDY, lora_request=rb)
    assert tokens(llm.generate([PROMPTS[3]], GREEDY, lora_request=rb, use_tqdm=False)) == before  # loaded again
    assert engine.loras.get("b").uid != uid  # a new prefix-cache key: blocks cached before the reload are not reused
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_engine_without_lora_has_no_lora_layers(base, adapters):
    plain = LLM(str(base), dtype="float32", kv_cache_memory=0.002, block_size=4)
    assert not any(isinstance(m, MultiLoRALinear) for m in plain.engine.model.modules())
    with pytest.raises(ValueError, match="built without LoRA support; build it with enable_lora=True"):
        plain.generate(PROMPTS[:1], GREEDY, lora_request=adapters["a"][0], use_tqdm=False)


def edit_config(adapter, **changes):
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


UNFIT = {  # PEFT adapter config (or a change to one) -> the error
    "rank above max_lora_rank": (dict(r=16, target_modules=["q_proj"]), None, "r = 16 exceeds the engine's "
                                 "max_lora_rank=8; raise --max-lora-rank"),
    "dora": (dict(r=4, target_modules=["q_proj"], use_dora=True), None, "DoRA.* is not supported for multi-LoRA"),
    "modules_to_save": (dict(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]), None,
                        r"modules_to_save = \['lm_head'\] trains whole modules"),
    "lm_head": (dict(r=4, target_modules=["q_proj", "lm_head"]), None,
                "adapts lm_head, the output layer; served adapters may adapt down_proj, gate_proj"),
    "absent target": (dict(r=4, target_modules=["q_proj"]), dict(target_modules=["q_proj", "c_attn"]),
                      "target module 'c_attn' matches no linear layer of the model"),
    "missing directory": (None, None, "adapter directory .* not found"),
    "biases": (dict(r=4, target_modules=["q_proj"]), dict(bias="all"), r"bias = 'all' \(trained biases\)"),
}


@pytest.mark.parametrize("case", UNFIT)
def test_unfit_adapter_fails_loudly_at_load(case, spare, base, tmp_path):
    config, change, message = UNFIT[case]
    if config is not None:
        save_peft_adapter(base, tmp_path / "bad", **config)
    if change:
        edit_config(tmp_path / "bad", **change)
    with pytest.raises(LmforgeError, match=message) as error:
        spare.add_lora(LoRARequest("bad", 9, str(tmp_path / "bad")))
    assert "\n" not in str(error.value) and [a.name for a in spare.list_loras()] == ["a"]
    free = 1 - spare.engine.loras.get("a").slot
    assert all(m.ranks[free] == 0 and not m.lora_b[free].any() and not m.lora_a[free].any()
               for m in spare.engine.loras.layers.values())


def test_adapter_of_another_base_model_names_the_mismatch(spare, tmp_path):
    wide = write_tiny(tmp_path / "wide", {**TINY_LLAMA, "hidden_size": 64, "intermediate_size": 96})
    save_peft_adapter(wide, tmp_path / "adapter", r=4, target_modules=["o_proj"])
    with pytest.raises(LmforgeError, match=r"has shape \(4, 64\), the model's model.layers.0.self_attn.o_proj needs "
                                           r"\(4, 32\).*trained on .*wide"):
        spare.add_lora(LoRARequest("wide", 9, str(tmp_path / "adapter")))
