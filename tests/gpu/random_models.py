"""Random-weight models of real shapes for the GPU checks (tests/gpu/, benchmarks/gpu.py): the GPU machine reaches no
network and the real SmolLM2 file (98 MB) does not travel there, so its shape is rebuilt with seeded random weights,
with a word-level tokenizer that covers the whole vocabulary (one token per id, "t123")."""

import json
from pathlib import Path

import torch

SMOLLM2_135M = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152, "hidden_size": 576,
    "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "tie_word_embeddings": True,
    "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
}
# Llama-3.2-1B's shape (its rope scaling left out: the weights are random anyway)
LLAMA_1B = {
    **SMOLLM2_135M, "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
    "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 131072, "rope_theta": 500000.0,
}


def write_tokenizer(path: Path, vocab_size: int) -> None:
    """tokenizer.json (word level, "t0".."t{n-1}", split on spaces; id 2 is the end of sequence) and its config."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(vocab_size)}
    vocab["<unk>"], vocab["<s>"], vocab["</s>"] = 0, 1, 2
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                            "unk_token": "<unk>"}))


def write_random(path: Path, config: dict, std: float = 0.02, seed: int = 0) -> Path:
    """A model directory of `config`'s shape: weights normal(0, std), norms 1, safetensors in config's dtype."""
    from lmforge.models import build_args
    from lmforge.weights.hf_dir import save_model

    path.mkdir(parents=True, exist_ok=True)
    if not (path / "model.safetensors").is_file() and not (path / "model.safetensors.index.json").is_file():
        cls, args = build_args(config)
        torch.manual_seed(seed)
        with torch.device("cpu"):
            model = cls(args).to(getattr(torch, config["torch_dtype"]))
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.fill_(1.0) if "norm" in name else p.normal_(0, std)
        save_model(model, config, path)
        write_tokenizer(path, config["vocab_size"])
    return path
