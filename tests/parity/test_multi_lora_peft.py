"""Multi-LoRA serving layers vs PEFT on transformers, for every model family (fp32, tiny random configs): one flat
batch whose sequences use the base model and two PEFT adapters of different ranks (one rsLoRA) gives each sequence
PEFT's logits for its adapter. Proves every family's call sites hand the step's LoraBatch to each projection."""

import dataclasses

import pytest
import torch

from lmforge.engine.lora_manager import LoRAManager, LoRARequest
from lmforge.layers.attention import AttnMeta
from lmforge.layers.linear import derive_weights
from lmforge.layers.multi_lora import NO_ADAPTER, LoraBatch, add_multi_lora
from lmforge.models import build_model
from tests.adapters import save_peft_adapter
from tests.parity.hf_reference import save_tiny

pytest.importorskip("peft")

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)
DENSE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
QWEN_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48)
CASES = {  # config class, model class, overrides, target modules of the two adapters
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}, DENSE),
    "qwen2-bias": ("Qwen2Config", "Qwen2ForCausalLM", {}, DENSE),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}, DENSE),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": None}, ["qkv_proj", "o_proj", "gate_up_proj",
                                                                     "down_proj"]),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4, "intermediate_size": 48}, ATTENTION),
    # sparse layer 0 (shared expert adapted), dense layer 1 (its MLP adapted), named by path: since PEFT 0.22 a bare
    # gate_proj / up_proj / down_proj also adapts the routed experts' fused parameters (target_parameters, with a
    # rank_pattern), which lmforge refuses
    "qwen2moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", {**QWEN_MOE, "mlp_only_layers": [1]},
                 ATTENTION + [f"{where}.{proj}" for where in ("shared_expert", "layers.1.mlp")
                              for proj in ("gate_proj", "up_proj", "down_proj")]),
}
SEQS = [(7, "a"), (5, None), (9, "b"), (1, "a"), (4, "b")]


@pytest.mark.parametrize("case", CASES)
def test_mixed_adapters_in_one_batch_match_peft(case, tmp_path):
    config_cls, model_cls, extra, targets = CASES[case]
    save_tiny(config_cls, model_cls, tmp_path / "base", **{**TINY, **extra})
    peft_models = {
        "a": save_peft_adapter(tmp_path / "base", tmp_path / "a", model_cls, seed=1, r=2, lora_alpha=4,
                               target_modules=targets),
        "b": save_peft_adapter(tmp_path / "base", tmp_path / "b", model_cls, seed=2, r=8, lora_alpha=4,
                               target_modules=targets[1:], use_rslora=True)}
    model = build_model(tmp_path / "base", dtype="float32", progress=False)
    loras = LoRAManager(model, add_multi_lora(model, max_loras=3, max_rank=8), max_loras=3, max_rank=8)
    derived = derive_weights(model)  # as the engine does: the adapted projections share their bases' joints
    slots = {None: NO_ADAPTER}
    for i, name in enumerate(("a", "b")):
        slots[name] = loras.add(LoRARequest(name, i + 1, str(tmp_path / name))).slot
    torch.manual_seed(0)
    seqs = [torch.randint(0, TINY["vocab_size"], (n,)) for n, _ in SEQS]
    lens = [n for n, _ in SEQS]
    meta = AttnMeta.for_sequences(lens)
    lora = LoraBatch.build([slots[name] for _, name in SEQS], lens, torch.device("cpu"))
    meta = dataclasses.replace(meta, lora=lora)
    with torch.no_grad(), derived.active():
        ours = model.logits(model(torch.cat(seqs), torch.cat([torch.arange(n) for n in lens]), meta)).split(lens)
        for seq, (_, name), mine in zip(seqs, SEQS, ours, strict=True):
            if name is None:
                with peft_models["a"].disable_adapter():
                    expected = peft_models["a"](seq[None]).logits[0]
            else:
                expected = peft_models[name](seq[None]).logits[0]
                with peft_models[name].disable_adapter():
                    assert (expected - peft_models[name](seq[None]).logits[0]).abs().max() > 1e-2  # really adapted
            torch.testing.assert_close(mine, expected, atol=1e-4, rtol=1e-4, msg=f"{case}: adapter {name}")
