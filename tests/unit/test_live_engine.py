"""The engine over a live model: it serves the object a trainer holds, leaves it as it found it, follows its weights
through update_weights(), and hands its KV memory back with sleep() (tiny random models of every family, fp32)."""

import os

import pytest
import torch

from lmforge import LLM, SamplingParams
from lmforge.config.schema import LoraConfig
from lmforge.data.dataset import IGNORE_INDEX
from lmforge.engine.config import EngineConfig
from lmforge.engine.llm_engine import LLMEngine
from lmforge.layers.attention import AttnMeta
from lmforge.layers.lora import add_lora, lora_layers
from lmforge.tokenizer import Tokenizer
from lmforge.train.loss import token_loss_sum
from lmforge.weights.peft import save_adapter
from tests.tiny import TINY_LLAMA, tiny_model
from tests.tokenizer_refs import llama_style_dir

VOCAB = 550  # the Llama-style test tokenizer's
BASE = {**TINY_LLAMA, "vocab_size": VOCAB}
FAMILIES = {
    "llama": BASE,
    "qwen2": {**BASE, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"},
    "qwen3": {**BASE, "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "head_dim": 16},
    "phi3": {**BASE, "architectures": ["Phi3ForCausalLM"], "model_type": "phi3"},
    "mixtral": {**BASE, "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "num_local_experts": 4,
                "num_experts_per_tok": 2},
    "qwen2moe": {**BASE, "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "num_experts": 4,
                 "num_experts_per_tok": 2, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 48,
                 "mlp_only_layers": [1]},
}
PROMPTS = [[1 + (7 * i + 3 * j) % 500 for j in range(3 + 4 * i)] for i in range(4)]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return Tokenizer.from_dir(llama_style_dir(tmp_path_factory.mktemp("tokenizer")))


def engine(model, tokenizer, **overrides) -> LLMEngine:
    config = dict(kv_cache_memory=0.004, block_size=4, max_model_len=64, enable_prefix_caching=False)
    return LLMEngine(model, tokenizer, EngineConfig(**{**config, **overrides}))


def generate(eng: LLMEngine, prompts=PROMPTS, params=GREEDY, prefix="r") -> list[list[int]]:
    for i, prompt in enumerate(prompts):
        eng.add_request(f"{prefix}{i}", prompt, params)
    done = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
    return [list(done[f"{prefix}{i}"].outputs[0].token_ids) for i in range(len(prompts))]


def lora_model(config=BASE, dropout=0.0):
    model = tiny_model(config)
    add_lora(model, LoraConfig(rank=4, alpha=8, dropout=dropout, target_modules="all-linear"))
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_(0, 0.3)  # an adapter that changes the outputs
    return model


def snapshot(model) -> tuple:
    """Everything the engine must leave as it found it: parameter objects, storage, versions and values, the module
    tree, each module's attributes and training flag."""
    params = {n: (id(p), p.data_ptr(), p._version, p.detach().clone(), p.requires_grad)
              for n, p in model.named_parameters(remove_duplicate=False)}
    modules = [(n, id(m), sorted(vars(m)), m.training) for n, m in model.named_modules()]
    return params, modules


def assert_same(a: tuple, b: tuple) -> None:
    assert a[1] == b[1]
    assert a[0].keys() == b[0].keys()
    for name, (pid, ptr, version, value, grad) in a[0].items():
        other = b[0][name]
        assert (pid, ptr, version, grad) == (other[0], other[1], other[2], other[4]), name
        assert torch.equal(value, other[3]), name


def sampled_logprobs_by_training_forward(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """log p(token | prefix) for each generated token, from the training forward (autograd on, plain F.linear)."""
    ids = torch.tensor(prompt + tokens)
    with torch.enable_grad():
        hidden = model(ids, torch.arange(len(ids)), AttnMeta.for_sequences([len(ids)]))
        logprobs = torch.log_softmax(model.logits(hidden).float(), -1)
    rows = torch.arange(len(prompt) - 1, len(ids) - 1)
    return logprobs[rows, ids[rows + 1]].detach()


def test_the_engine_leaves_a_training_model_as_it_found_it(tokenizer):
    """A LoRA model in training mode (dropout on): the engine serves it with dropout off and its adapter applied
    (each token the argmax of the training forward in eval mode), and afterwards every parameter, module,
    attribute and training flag is what it was."""
    model = lora_model(dropout=0.3).train()
    before = snapshot(model)
    eng = engine(model, tokenizer)
    outs = generate(eng)
    assert_same(before, snapshot(model))
    assert model.training
    assert eng.runner.graphs.replays > 0 and not eng.runner.graphs.eager  # the adapters' products are recorded
    model.eval()
    for prompt, tokens in zip(PROMPTS, outs, strict=True):
        ids = torch.tensor(prompt + tokens)
        with torch.no_grad():
            logits = model.logits(model(ids, torch.arange(len(ids)), AttnMeta.for_sequences([len(ids)])))
        assert logits[len(prompt) - 1:-1].argmax(-1).tolist() == tokens
    lora_free = tiny_model(BASE)
    assert generate(engine(lora_free, tokenizer)) != outs  # the adapter mattered


@pytest.mark.parametrize("family", FAMILIES)
def test_sampled_log_probs_equal_the_training_forwards_before_and_after_update_weights(family, tokenizer):
    model = tiny_model(FAMILIES[family])
    eng = engine(model, tokenizer, seed=3)
    params = SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True, logprobs=0)

    def check() -> list[list[int]]:
        for i, prompt in enumerate(PROMPTS):
            eng.add_request(f"v{eng.weight_version}-{i}", prompt, params)
        outs = []
        while eng.has_unfinished_requests():
            outs += [o for o in eng.step() if o.finished]
        outs.sort(key=lambda o: o.request_id)
        for prompt, out in zip(PROMPTS, outs, strict=True):
            tokens = list(out.outputs[0].token_ids)
            engine_lp = torch.tensor([d[t].logprob for d, t in zip(out.outputs[0].logprobs, tokens, strict=True)])
            torch.testing.assert_close(engine_lp, sampled_logprobs_by_training_forward(model, prompt, tokens),
                                       atol=1e-4, rtol=0)
        return [list(o.outputs[0].token_ids) for o in outs]

    first = check()
    with torch.no_grad():  # what optimizer steps do: every weight changed in place
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=0.1)
    assert eng.update_weights() == 1
    assert check() != first


def test_update_weights_takes_a_state_dict_or_a_peft_adapter_directory(tokenizer, tmp_path):
    model = lora_model()
    eng = engine(model, tokenizer)
    generate(eng)
    # a state dict: copied in place into the live model's parameters, whose objects stay the same
    target = lora_model()
    with torch.no_grad():
        for p in target.parameters():
            p.mul_(1.5)
    ids = {n: id(p) for n, p in model.named_parameters()}
    eng.update_weights({n: t for n, t in target.state_dict().items() if "lora_" not in n})
    assert {n: id(p) for n, p in model.named_parameters()} == ids
    # a PEFT adapter directory: into the live model's LoRA layers
    adapter = save_adapter(target, tmp_path / "adapter", LoraConfig(rank=4, alpha=8, target_modules="all-linear"),
                           "tiny")
    assert eng.update_weights(str(adapter)) == 2
    expected = generate(engine(target, tokenizer), prefix="t")
    assert generate(eng, prefix="u") == expected
    with pytest.raises(KeyError, match="no tensor 'nope'"):
        eng.update_weights({"nope": torch.zeros(1)})
    eng.add_request("busy", PROMPTS[0], GREEDY)
    with pytest.raises(RuntimeError, match="in flight"):
        eng.update_weights()
    eng.abort("busy")


def test_two_engines_and_a_training_step_interleaved_do_not_disturb_each_other(tokenizer):
    """One engine with kernels and step graphs, one enforce_eager, sampling without seeds, both over the same
    live model (full fine-tuning: every parameter trainable), stepped alternately with a training step that draws
    from torch's global RNG between: each engine gives what it gives alone, and the gradients are those of the
    training step without engines."""
    sampled = SamplingParams(temperature=0.9, max_tokens=10, ignore_eos=True)
    model = tiny_model(BASE)
    ids = torch.tensor(PROMPTS[3])
    meta = AttnMeta.for_sequences([len(ids)])

    def gradients() -> dict[str, torch.Tensor]:
        torch.manual_seed(7)
        labels = torch.roll(ids, -1).masked_fill(torch.rand(len(ids)) < 0.3, IGNORE_INDEX)  # the global RNG decides
        model.zero_grad()
        token_loss_sum(model, model(ids, torch.arange(len(ids)), meta), labels).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    alone_grads = gradients()
    rng = torch.random.get_rng_state()
    alone_fast = generate(engine(model, tokenizer, seed=5), params=sampled)
    alone_eager = generate(engine(model, tokenizer, seed=6, enforce_eager=True), params=sampled)
    fast, eager = engine(model, tokenizer, seed=5), engine(model, tokenizer, seed=6, enforce_eager=True)
    for i, prompt in enumerate(PROMPTS):
        fast.add_request(f"r{i}", prompt, sampled)
        eager.add_request(f"r{i}", prompt, sampled)
    done: dict[str, dict] = {"fast": {}, "eager": {}}
    while fast.has_unfinished_requests() or eager.has_unfinished_requests():
        for name, eng in (("fast", fast), ("eager", eager)):
            done[name].update({o.request_id: list(o.outputs[0].token_ids) for o in eng.step() if o.finished})
            grads = gradients()
            assert grads.keys() == alone_grads.keys()
            assert all(torch.equal(grads[n], alone_grads[n]) for n in grads)
    assert torch.equal(torch.random.get_rng_state(), rng)  # gradients() reseeds it: unchanged since then
    assert [done["fast"][f"r{i}"] for i in range(len(PROMPTS))] == alone_fast
    assert [done["eager"][f"r{i}"] for i in range(len(PROMPTS))] == alone_eager
    assert fast.runner.graphs.replays > 0 and eager.runner.graphs is None


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_sleep_hands_the_kv_pool_back_and_wake_restores_the_outputs(tokenizer):
    model = lora_model()
    eng = engine(model, tokenizer, kv_cache_memory=0.25)
    pool = sum(t.untyped_storage().nbytes() for t in {t.untyped_storage().data_ptr(): t
                                                      for layer in eng.runner.kv for t in layer}.values())
    assert pool >= 0.24 * 2**30
    before = generate(eng)
    rss = rss_bytes()
    eng.sleep()
    assert rss - rss_bytes() >= pool
    with pytest.raises(RuntimeError, match="asleep"):
        eng.add_request("late", PROMPTS[0], GREEDY)
    eng.wake()
    assert generate(eng, prefix="w") == before
    eng.add_request("busy", PROMPTS[0], GREEDY)
    with pytest.raises(RuntimeError, match="in flight"):
        eng.sleep()


def test_llm_accepts_a_module_and_its_tokenizer(tokenizer):
    model = tiny_model(BASE)
    llm = LLM(model=model, tokenizer=tokenizer, kv_cache_memory=0.004, block_size=4, max_model_len=64)
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in outs] == generate(engine(model, tokenizer))
    with pytest.raises(ValueError, match="tokenizer"):
        LLM(model=model)
    with pytest.raises(ValueError, match="live model"):
        LLM(model=model, tokenizer=tokenizer, quantization="int8")
