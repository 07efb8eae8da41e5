"""LoRALinear and add_lora: init, targeting, freezing, the disabled switch, merging, autocast, the engine path."""

import math

import pytest
import torch

from lmforge.config.schema import LoraConfig
from lmforge.errors import LmforgeError
from lmforge.layers.linear import Linear
from lmforge.layers.lora import LoRALinear, add_lora, lora_disabled, lora_layers, merge_lora
from tests.adapters import ours_logits, randomize_adapter, trainable
from tests.tiny import TINY_LLAMA, tiny_model

SEQS = [torch.tensor([3, 1, 4, 1, 5, 9, 2]), torch.tensor([6]), torch.tensor([5, 3, 5, 8, 9, 7, 9, 3, 2])]


def test_layer_starts_as_its_base_with_peft_names_and_init():
    base = Linear(32, 48)
    layer = LoRALinear(base, rank=8, alpha=16)
    assert [n for n, _ in layer.named_parameters()] == ["base_layer.weight", "base_layer.bias", "lora_A.weight",
                                                        "lora_B.weight"]
    assert layer.lora_A.weight.shape == (8, 32) and layer.lora_B.weight.shape == (48, 8)
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    bound = 1 / math.sqrt(32)  # kaiming-uniform with a = sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert layer.lora_A.weight.abs().max() <= bound and layer.lora_A.weight.std() > bound / 3
    x = torch.randn(5, 32)
    torch.testing.assert_close(layer(x), base(x))
    dora = LoRALinear(base, rank=8, alpha=16, dora=True)
    torch.testing.assert_close(dora.lora_magnitude_vector, base.weight.norm(dim=1))
    torch.testing.assert_close(dora(x), base(x))


@pytest.mark.parametrize("rslora,expected", [(False, 16 / 4), (True, 16 / 2)])
def test_update_is_scaled_b_a(rslora, expected):
    layer = LoRALinear(Linear(8, 6, bias=False), rank=4, alpha=16, rslora=rslora)
    randomize_adapter(layer)
    assert layer.scaling == expected
    x = torch.randn(3, 8)
    A, B = layer.lora_A.weight, layer.lora_B.weight
    torch.testing.assert_close(layer(x), x @ layer.base_layer.weight.T + expected * x @ A.T @ B.T)


def test_add_lora_freezes_the_base_and_counts_like_peft():
    model = tiny_model()
    summary = add_lora(model, LoraConfig(rank=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]))
    assert summary.adapted == ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                               "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj")
    names = set(trainable(model))
    assert "lm_head.weight" in names and all(".lora_" in n for n in names - {"lm_head.weight"})
    q_and_v = 2 * 4 * ((32 + 32) + (32 + 16))  # two layers, each q (32 -> 32) and v (32 -> 16) at rank 4
    assert summary.trainable == q_and_v + 96 * 32
    assert summary.total == sum(p.numel() for p in model.parameters())
    assert str(summary) == (f"trainable params: {summary.trainable:,} || all params: {summary.total:,} || "
                            f"trainable%: {100 * summary.trainable / summary.total:.4f}")


def test_all_linear_spares_the_lm_head():
    model = tiny_model()
    summary = add_lora(model, LoraConfig(target_modules="all-linear"))
    assert len(summary.adapted) == 2 * 7 and not isinstance(model.lm_head, LoRALinear)
    assert {p.rpartition(".")[2] for p in summary.adapted} == {"q_proj", "k_proj", "v_proj", "o_proj",
                                                               "gate_proj", "up_proj", "down_proj"}


def test_unknown_target_names_the_layers_that_exist():
    with pytest.raises(LmforgeError, match=r"'qkv' matches no linear layer.*down_proj, gate_proj, k_proj, "
                                           r"lm_head, o_proj, q_proj, up_proj, v_proj"):
        add_lora(tiny_model(), LoraConfig(target_modules=["q_proj", "qkv"]))
    with pytest.raises(LmforgeError, match="'embed_tokens' matches no linear layer"):  # an embedding, not linear
        add_lora(tiny_model(), LoraConfig(target_modules=["embed_tokens"]))
    with pytest.raises(LmforgeError, match="modules_to_save: 'head' matches no module"):
        add_lora(tiny_model(), LoraConfig(modules_to_save=["head"]))
    model = tiny_model()
    add_lora(model, LoraConfig())
    with pytest.raises(LmforgeError, match="already has LoRA layers"):
        add_lora(model, LoraConfig())


def test_disabled_computes_the_base_model():
    model = tiny_model()
    with torch.no_grad():
        base = ours_logits(model, SEQS)
    add_lora(model, LoraConfig(target_modules="all-linear", dora=True))
    randomize_adapter(model)
    with torch.no_grad():
        adapted = ours_logits(model, SEQS)
        with lora_disabled(model):
            torch.testing.assert_close(ours_logits(model, SEQS), base)
        torch.testing.assert_close(ours_logits(model, SEQS), adapted)  # switched back on
    assert (adapted - base).abs().max() > 1e-2


@pytest.mark.parametrize("dora", [False, True])
def test_reference_log_probs_with_adapters_off_are_the_base_models_bit_for_bit(dora):
    """DPO's reference policy for LoRA / QLoRA is the same model with its adapters switched off: its per-document
    log-probs (train/preference.py) equal those of the base model without adapters, bit for bit."""
    from lmforge.data.dataset import IGNORE_INDEX
    from lmforge.layers.attention import AttnMeta
    from lmforge.train.preference import sequence_logps

    lens = [len(s) for s in SEQS]
    ids, positions = torch.cat(SEQS), torch.cat([torch.arange(n) for n in lens])
    labels = torch.cat([torch.cat([s[1:], torch.tensor([IGNORE_INDEX])]) for s in SEQS])
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])

    def logps(model):
        with torch.no_grad():
            return sequence_logps(model, model(ids, positions, AttnMeta.for_sequences(lens)), labels, cu)[0]

    model = tiny_model()
    base = logps(model)
    add_lora(model, LoraConfig(target_modules="all-linear", dora=dora))
    randomize_adapter(model)
    with lora_disabled(model):
        assert torch.equal(logps(model), base)
    assert not torch.equal(logps(model), base)  # the adapter is back on


@pytest.mark.parametrize("kind", ["lora", "rslora", "dora"])
def test_merged_model_computes_the_unmerged_one(kind):
    config = {**TINY_LLAMA, "attention_bias": True}
    model = tiny_model(config)
    add_lora(model, LoraConfig(target_modules="all-linear", rslora=kind == "rslora", dora=kind == "dora"))
    randomize_adapter(model)
    with torch.no_grad():
        unmerged = ours_logits(model, SEQS)
        assert merge_lora(model) == 14
        assert not lora_layers(model) and type(model.model.layers[0].self_attn.q_proj) is Linear
        torch.testing.assert_close(ours_logits(model, SEQS), unmerged, atol=1e-5, rtol=1e-5)
    assert set(model.state_dict()) == set(tiny_model(config).state_dict())  # HF names again


def test_merging_an_nf4_base_is_refused():
    model = tiny_model()
    add_lora(model, LoraConfig(), quantize=True)
    with pytest.raises(LmforgeError, match="cannot merge a LoRA adapter into NF4"):
        merge_lora(model)


def test_tied_lm_head_trains_its_own_copy():
    model = tiny_model({**TINY_LLAMA, "tie_word_embeddings": True})
    embed = model.model.embed_tokens.weight.detach().clone()
    add_lora(model, LoraConfig(modules_to_save=["lm_head"]))
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert model.lm_head.weight.requires_grad and not model.model.embed_tokens.weight.requires_grad
    opt = torch.optim.SGD(trainable(model).values(), lr=0.1)
    ours_logits(model, SEQS).sum().backward()
    opt.step()
    assert torch.equal(model.model.embed_tokens.weight, embed) and not torch.equal(model.lm_head.weight, embed)


def test_bf16_base_fp32_adapter_under_autocast():
    model = tiny_model(dtype=torch.bfloat16)
    add_lora(model, LoraConfig(target_modules="all-linear", dora=True, modules_to_save=["lm_head"]))
    randomize_adapter(model)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.lora_A.weight.dtype == torch.float32 and layer.base_layer.weight.dtype == torch.bfloat16
    assert model.lm_head.weight.dtype == torch.float32  # trained in full: kept in fp32 like the LoRA factors
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = ours_logits(model, SEQS)
    torch.nn.functional.cross_entropy(logits, torch.randint(0, 96, (logits.shape[0],))).backward()
    grads = [p.grad for p in trainable(model).values()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert all(g.abs().max() > 0 for g in grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_runs_a_lora_model_as_the_eager_forward_does(dtype):
    """The engine fuses only plain Linear groups: wrapped q/k/v stay separate, gate/up are fused, and a paged
    prefill + decode step through ModelRunner matches the training forward."""
    from lmforge.engine.model_runner import ModelRunner
    from lmforge.engine.sampling_params import SamplingParams
    from lmforge.engine.scheduler import ScheduledBatch
    from lmforge.engine.sequence import Sequence

    model = tiny_model(dtype=dtype)
    add_lora(model, LoraConfig(target_modules=["q_proj", "k_proj", "v_proj", "down_proj"], dora=True))
    randomize_adapter(model)
    with torch.no_grad():
        eager = ours_logits(model, SEQS)
    runner = ModelRunner(model.eval(), num_blocks=16, block_size=4)
    layer = model.model.layers[0]
    assert layer.mlp.gate_proj in runner.derived.joints  # plain gate/up: fused
    assert layer.self_attn.q_proj.base_layer not in runner.derived.joints  # wrapped q/k/v: left alone
    seqs = [Sequence(f"r{i}", s.tolist()[:-1], SamplingParams()) for i, s in enumerate(SEQS) if len(s) > 1]
    for i, seq in enumerate(seqs):
        seq.block_table = [3 * i, 3 * i + 1, 3 * i + 2]
    prefill, _, _ = runner.execute(ScheduledBatch(seqs, [s.num_tokens for s in seqs]))
    for seq, s in zip(seqs, (SEQS[0], SEQS[2]), strict=True):
        seq.num_computed_tokens = seq.num_tokens
        seq.token_ids.append(int(s[-1]))
    decode, _, _ = runner.execute(ScheduledBatch(seqs, [1, 1]))
    last = [len(SEQS[0]) - 2, len(SEQS[0]) - 1, len(SEQS[0]) + 1 + len(SEQS[2]) - 2, eager.shape[0] - 1]
    atol = 1e-4 if dtype == torch.float32 else 0.1
    torch.testing.assert_close(prefill.float(), eager[[last[0], last[2]]], atol=atol, rtol=0.02)
    torch.testing.assert_close(decode.float(), eager[[last[1], last[3]]], atol=atol, rtol=0.02)
