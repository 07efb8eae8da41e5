"""Logits parity with transformers (fp32, tiny random configs) for qwen3.py and phi3.py."""

import json

import pytest

from tests.parity.hf_reference import max_logit_diff, save_tiny

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
LONG_SEQS = (9, 12, 16, 10)  # every sequence past original_max_position_embeddings=8: long factors throughout


def _longrope(rotary_dim: int, original: int) -> dict:
    half = rotary_dim // 2
    return {"rope_parameters": {"rope_type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(half)],
                                "long_factor": [1.0 + 2.0 * i for i in range(half)]},
            "original_max_position_embeddings": original}


QWEN3 = {
    "qwen3": {"head_dim": 16},
    "qwen3-headdim-gqa4": {"head_dim": 32, "num_key_value_heads": 1},
    "qwen3-tied-bias": {"head_dim": 16, "tie_word_embeddings": True, "attention_bias": True},
    "qwen3-window": {"head_dim": 16, "use_sliding_window": True, "sliding_window": 5, "max_window_layers": 1},
}

PHI3 = {  # (overrides, sequence lengths)
    "phi3": ({}, None),
    "phi3-tied-mha": ({"tie_word_embeddings": True, "num_key_value_heads": 4}, None),
    "phi3-partial": ({"partial_rotary_factor": 0.5}, None),
    "phi3-window": ({"sliding_window": 5}, None),
    "phi3-longrope-short": (_longrope(16, 16), None),
    "phi3-longrope-long": (_longrope(16, 8), LONG_SEQS),
    "phi3-longrope-factor": ({**_longrope(16, 8), "rope_parameters": {**_longrope(16, 8)["rope_parameters"],
                                                                      "factor": 2.0}}, LONG_SEQS),
    "phi3-longrope-partial-long": ({**_longrope(12, 8), "partial_rotary_factor": 0.75}, LONG_SEQS),
}


@pytest.mark.parametrize("case", QWEN3)
def test_qwen3_logits_match_transformers(case, tmp_path):
    ref = save_tiny("Qwen3Config", "Qwen3ForCausalLM", tmp_path, **{**TINY, **QWEN3[case]})
    assert max_logit_diff(ref, tmp_path, TINY["vocab_size"]) < 1e-4


@pytest.mark.parametrize("case", PHI3)
def test_phi3_logits_match_transformers(case, tmp_path):
    extra, seq_lens = PHI3[case]
    ref = save_tiny("Phi3Config", "Phi3ForCausalLM", tmp_path, **{**TINY, "pad_token_id": None, **extra})
    assert max_logit_diff(ref, tmp_path, TINY["vocab_size"], seq_lens or (7, 1, 13, 4)) < 1e-4


def test_phi3_longrope_v4_config(tmp_path):
    """Released Phi-3 configs keep original_max_position_embeddings beside `rope_scaling`, not inside it."""
    ref = save_tiny("Phi3Config", "Phi3ForCausalLM", tmp_path, **{**TINY, "pad_token_id": None, **_longrope(16, 8)})
    path = tmp_path / "config.json"
    cfg = json.loads(path.read_text())
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params["rope_theta"]
    cfg["rope_scaling"] = {k: params[k] for k in ("short_factor", "long_factor")} | {"type": "longrope"}
    path.write_text(json.dumps(cfg))
    assert max_logit_diff(ref, tmp_path, TINY["vocab_size"], LONG_SEQS) < 1e-4
