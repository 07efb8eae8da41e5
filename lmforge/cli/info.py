"""lmforge info MODEL: what a checkpoint is and what it costs, without loading its weights."""

import argparse
import json

import torch

from lmforge.weights.resolve import DEFAULT_MODEL


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="describe a model: architecture, size, memory, context, chat template",
                       description="Describe a model without loading its weights.")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"model directory, .gguf file, Hub id or alias (default: {DEFAULT_MODEL})")
    p.add_argument("--json", action="store_true", help="print the facts as JSON")
    p.set_defaults(run=run)


def describe(model_dir) -> dict:
    from lmforge.models import build_args, resolve_dtype
    from lmforge.models.config import read_config
    from lmforge.tokenizer import Tokenizer

    cfg = read_config(model_dir)
    cls, a = build_args(cfg, str(model_dir / "config.json"))
    with torch.device("meta"):
        params = sum(p.numel() for p in cls(a).parameters())
    dtype = resolve_dtype("auto", cfg)
    width = torch.finfo(dtype).bits // 8
    kv_per_token = 2 * a.num_hidden_layers * a.num_key_value_heads * a.head_dim * width
    context = cfg.get("max_position_embeddings")
    try:
        template = Tokenizer.from_dir(model_dir).chat_template is not None
    except Exception as e:  # a model dir without tokenizer files is still describable
        template = f"unknown ({e})"
    return {
        "path": str(model_dir),
        "architecture": cfg["architectures"][0],
        "parameters": params,
        "dtype": str(dtype).removeprefix("torch."),
        "weights_gib": round(params * width / 2**30, 3),
        "kv_cache_mib_per_1k_tokens": round(kv_per_token * 1024 / 2**20, 2),
        "context_length": context,
        "layers": a.num_hidden_layers,
        "hidden_size": a.hidden_size,
        "heads": f"{a.num_attention_heads} query / {a.num_key_value_heads} key-value",
        "vocab_size": a.vocab_size,
        "tied_embeddings": a.tie_word_embeddings,
        "chat_template": template,
    }


def run(args: argparse.Namespace) -> int:
    from lmforge.weights.resolve import resolve_model

    facts = describe(resolve_model(args.model))
    if args.json:
        print(json.dumps(facts, indent=2))
    else:
        width = max(map(len, facts))
        for key, value in facts.items():
            print(f"{key.replace('_', ' '):<{width}}  {value:,}" if isinstance(value, int) and not isinstance(
                value, bool) else f"{key.replace('_', ' '):<{width}}  {value}")
    return 0
