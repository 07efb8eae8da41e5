"""Logits parity with transformers (fp32, tiny random configs) for the llama.py family."""

import pytest

from tests.parity.hf_reference import max_logit_diff, save_tiny

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)

CASES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama-tied-bias": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": True, "attention_bias": True,
                                                             "mlp_bias": True}),
    "llama-mha-headdim": ("LlamaConfig", "LlamaForCausalLM", {"num_key_value_heads": 4, "head_dim": 32}),
    "llama-linear": ("LlamaConfig", "LlamaForCausalLM", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "llama-dynamic": ("LlamaConfig", "LlamaForCausalLM", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0},
                                                           "max_position_embeddings": 8}),
    "llama3-rope": ("LlamaConfig", "LlamaForCausalLM", {"rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}}),
    "llama-yarn": ("LlamaConfig", "LlamaForCausalLM", {"rope_scaling": {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "mistral-window": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 5}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen2-tied": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True}),
}


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(case, tmp_path):
    config_cls, model_cls, extra = CASES[case]
    ref = save_tiny(config_cls, model_cls, tmp_path, **{**TINY, **extra})
    seq_lens = (7, 1, 13, 4) if case != "llama-dynamic" else (5,)
    assert max_logit_diff(ref, tmp_path, TINY["vocab_size"], seq_lens) < 1e-4
