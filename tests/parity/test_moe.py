"""Logits parity with transformers (fp32, tiny random configs) for mixtral.py and qwen_moe.py, plus MoE dispatch."""

import json

import pytest
import torch
from torch import nn

from lmforge.layers.mlp import GatedMLP
from lmforge.layers.moe import dispatch, route
from tests.parity.hf_reference import max_logit_diff, save_tiny

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
SEQ_LENS = (17, 1, 29, 9)  # 56 tokens x top-2 of 8 experts: every expert gets tokens
QWEN_MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32)

CASES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 8, "intermediate_size": 48}),
    "mixtral-tied-window-top3": ("MixtralConfig", "MixtralForCausalLM", {
        "num_local_experts": 8, "num_experts_per_tok": 3, "tie_word_embeddings": True, "sliding_window": 5}),
    "mixtral-headdim": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4, "head_dim": 32}),
    "qwen2moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", {**QWEN_MOE, "shared_expert_intermediate_size": 48}),
    "qwen2moe-normtopk-tied": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", {
        **QWEN_MOE, "shared_expert_intermediate_size": 48, "norm_topk_prob": True, "tie_word_embeddings": True}),
    "qwen2moe-sparse-step": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", {  # only layer 1 is sparse
        **QWEN_MOE, "shared_expert_intermediate_size": 48, "num_hidden_layers": 4, "decoder_sparse_step": 2,
        "mlp_only_layers": [3]}),
    "qwen2moe-window-nobias": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", {
        **QWEN_MOE, "shared_expert_intermediate_size": 48, "qkv_bias": False, "use_sliding_window": True,
        "sliding_window": 5, "max_window_layers": 1}),
    "qwen3moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {**QWEN_MOE, "head_dim": 32}),
    "qwen3moe-normtopk-tied-bias": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {
        **QWEN_MOE, "norm_topk_prob": True, "tie_word_embeddings": True, "attention_bias": True}),
    "qwen3moe-mlp-only": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {**QWEN_MOE, "mlp_only_layers": [0]}),
    "qwen3moe-window": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {
        **QWEN_MOE, "use_sliding_window": True, "sliding_window": 5}),
}


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(case, tmp_path):
    config_cls, model_cls, extra = CASES[case]
    ref = save_tiny(config_cls, model_cls, tmp_path, **{**TINY, **extra})
    assert max_logit_diff(ref, tmp_path, TINY["vocab_size"], SEQ_LENS) < 1e-4


def test_released_config_spellings(tmp_path):
    """Checkpoints on the Hub say num_experts (not v5's num_local_experts) and Qwen2-MoE ones carry no layer_types."""
    extra = {**QWEN_MOE, "shared_expert_intermediate_size": 48, "use_sliding_window": True, "sliding_window": 5,
             "max_window_layers": 2, "num_hidden_layers": 3}
    ref = save_tiny("Qwen2MoeConfig", "Qwen2MoeForCausalLM", tmp_path, **{**TINY, **extra})
    path = tmp_path / "config.json"
    cfg = json.loads(path.read_text())
    assert cfg.pop("layer_types") == ["sliding_attention", "full_attention", "full_attention"]
    path.write_text(json.dumps(cfg))
    assert max_logit_diff(ref, tmp_path, TINY["vocab_size"], SEQ_LENS) < 1e-4

    ref = save_tiny("Qwen3MoeConfig", "Qwen3MoeForCausalLM", tmp_path, **{**TINY, **QWEN_MOE})
    cfg = json.loads(path.read_text())
    cfg["num_experts"] = cfg.pop("num_local_experts")
    path.write_text(json.dumps(cfg))
    assert max_logit_diff(ref, tmp_path, TINY["vocab_size"], SEQ_LENS) < 1e-4


@pytest.mark.parametrize("renormalize", [False, True])
def test_dispatch_matches_dense_mixture(renormalize):
    """Every expert on every token, weighted by a dense routing matrix, is what dispatch must reproduce."""
    num_experts, top_k, hidden = 6, 2, 16
    experts = nn.ModuleList(GatedMLP(hidden, 24, "silu") for _ in range(num_experts))
    x = torch.randn(40, hidden)
    logits = torch.randn(40, num_experts)
    logits[:, 5] = -1e4  # expert 5 receives no tokens
    weights, indices = route(logits, top_k, renormalize)
    assert weights.dtype == torch.float32
    assert torch.allclose(weights.sum(-1), torch.ones(40)) == renormalize
    dense = torch.zeros(40, num_experts).scatter(1, indices, weights)
    expected = sum(dense[:, e, None] * experts[e](x) for e in range(num_experts))
    with torch.no_grad():
        assert torch.allclose(dispatch(x, weights, indices, experts), expected, atol=1e-6)
    assert indices.unique().numel() == num_experts - 1
