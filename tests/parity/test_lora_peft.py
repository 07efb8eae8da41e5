"""LoRA / rsLoRA / DoRA / modules_to_save vs PEFT on transformers: same adapter weights give the same logits and
the same gradients of every trainable tensor (fp32, tiny random Llama)."""

import pytest
import torch

from lmforge.config.schema import LoraConfig
from lmforge.layers.lora import add_lora
from lmforge.models import build_model
from tests.adapters import hf_logits, ours_logits, peft_param_name, randomize_adapter, trainable
from tests.parity.hf_reference import save_tiny

peft = pytest.importorskip("peft")

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
CASES = {
    "lora-subset": (dict(target_modules=["q_proj", "v_proj"]), {}),
    "lora-all-linear": (dict(target_modules="all-linear", rank=4, alpha=32), {}),
    "lora-biased-base": (dict(target_modules=ATTENTION), {"attention_bias": True, "mlp_bias": True}),
    "rslora": (dict(target_modules=ATTENTION, rank=16, alpha=8, rslora=True), {}),
    "dora-all-linear": (dict(target_modules="all-linear", dora=True), {}),
    "dora-biased-base": (dict(target_modules=["q_proj", "down_proj"], dora=True), {"attention_bias": True,
                                                                                  "mlp_bias": True}),
    "dora-rslora-lm-head": (dict(target_modules="all-linear", dora=True, rslora=True, modules_to_save=["lm_head"]),
                            {}),
    "lm-head-tied": (dict(target_modules=["o_proj", "up_proj"], modules_to_save=["lm_head"]),
                     {"tie_word_embeddings": True}),
}


def peft_config(cfg: LoraConfig):
    return peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                           target_modules=cfg.target_modules, use_rslora=cfg.rslora, use_dora=cfg.dora,
                           modules_to_save=cfg.modules_to_save or None, task_type="CAUSAL_LM")


def paired_models(tmp_path, lora: dict, hf: dict):
    """lmforge and PEFT on the same tiny checkpoint, every trainable tensor of PEFT's set from lmforge's."""
    ref = save_tiny("LlamaConfig", "LlamaForCausalLM", tmp_path, **{**TINY, **hf})
    ours = build_model(tmp_path, dtype="float32", progress=False)
    cfg = LoraConfig(**lora)
    summary = add_lora(ours, cfg)
    randomize_adapter(ours)
    theirs = peft.get_peft_model(ref, peft_config(cfg))
    mine = trainable(ours)
    names = {peft_param_name(n, summary.saved): p for n, p in mine.items()}
    assert set(names) == set(trainable(theirs))  # the same tensors are trained, no more, no fewer
    with torch.no_grad():
        params = dict(theirs.named_parameters())
        for name, p in names.items():
            params[name].copy_(p)
    return ours, theirs, summary


@pytest.mark.parametrize("case", CASES)
def test_logits_and_gradients_match_peft(case, tmp_path):
    ours, theirs, summary = paired_models(tmp_path, *CASES[case])
    seqs = [torch.randint(0, TINY["vocab_size"], (n,)) for n in (7, 1, 12)]
    labels = torch.randint(0, TINY["vocab_size"], (20,))
    ours.train(), theirs.train()
    mine, logits = ours_logits(ours, seqs), hf_logits(theirs, seqs)
    torch.testing.assert_close(mine, logits, atol=1e-5, rtol=1e-5)
    with torch.no_grad(), theirs.disable_adapter():
        assert (mine - hf_logits(theirs, seqs)).abs().max() > 1e-2  # the adapter really changes the output
    torch.nn.functional.cross_entropy(mine, labels).backward()
    torch.nn.functional.cross_entropy(logits, labels).backward()
    params = dict(theirs.named_parameters())
    for name, p in trainable(ours).items():
        theirs_grad = params[peft_param_name(name, summary.saved)].grad
        assert p.grad is not None and p.grad.abs().max() > 0, name
        torch.testing.assert_close(p.grad, theirs_grad, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("dora", [False, True])
def test_dropout_matches_peft_under_the_same_seed(dora, tmp_path):
    """Dropout sits on the LoRA input (and DoRA's base term sees the same dropped input): with the same RNG
    state both draw the same masks, so training-mode outputs agree exactly and differ from eval mode."""
    ours, theirs, _ = paired_models(tmp_path, dict(target_modules="all-linear", dropout=0.3, dora=dora), {})
    seq = torch.randint(0, TINY["vocab_size"], (9,))
    ours.train(), theirs.train()
    torch.manual_seed(7)
    mine = ours_logits(ours, [seq])
    torch.manual_seed(7)
    torch.testing.assert_close(mine, hf_logits(theirs, [seq]), atol=1e-5, rtol=1e-5)
    ours.eval()
    with torch.no_grad():
        assert (ours_logits(ours, [seq]) - mine).abs().max() > 1e-3  # dropout was really applied
