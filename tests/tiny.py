"""Tiny random checkpoints written by lmforge itself, for unit tests that need a model directory."""

import json
from pathlib import Path

import torch

from lmforge.models import build_args
from lmforge.weights.hf_dir import save_model

TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 96, "hidden_size": 32,
    "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False,
    "torch_dtype": "float32",
}


def tiny_model(config: dict | None = None, dtype: torch.dtype = torch.float32):
    config = config or TINY_LLAMA
    cls, args = build_args(config)
    torch.manual_seed(0)
    model = cls(args).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def write_tiny(path: Path, config: dict | None = None, dtype: torch.dtype = torch.float32, **save_kwargs) -> Path:
    config = config or TINY_LLAMA
    save_model(tiny_model(config, dtype), config, path, **save_kwargs)
    return path


def write_config(path: Path, config: dict) -> None:
    (path / "config.json").write_text(json.dumps(config))
