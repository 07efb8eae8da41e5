"""lmforge merge BASE ADAPTER OUT: fold a PEFT LoRA adapter into its base model and write an HF directory."""

import argparse
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("merge", help="merge a LoRA adapter into its base model (an HF directory)",
                       description="Merge a PEFT LoRA / DoRA adapter (trained by lmforge, QLoRA included, or by "
                                   "PEFT) into the full-precision base model and write a Hugging Face directory "
                                   "(config.json, safetensors, tokenizer files) that needs no adapter.")
    p.add_argument("base", help="the base model: an HF model directory, .gguf file, alias or Hub id")
    p.add_argument("adapter", help="the PEFT adapter directory (adapter_config.json, adapter_model.safetensors)")
    p.add_argument("out", help="output directory (must not exist or be empty)")
    p.add_argument("--dtype", default="auto", help="dtype of the written weights: auto (the base's), float32, "
                   "bfloat16 or float16; each merged weight is computed in float32 and rounded once")
    p.add_argument("--max-shard-size", type=float, default=5.0, metavar="GIB",
                   help="split the weights into shards of at most this many GiB (default 5)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from lmforge.weights.merge import merge_to_dir

    merge_to_dir(args.base, args.adapter, args.out, args.dtype, int(args.max_shard_size * 2**30))
    print(f"wrote {Path(args.out).expanduser()}")
    return 0
