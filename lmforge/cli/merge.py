"""lmforge merge BASE ADAPTER OUT: fold a PEFT LoRA adapter into its base model and write an HF directory."""

import argparse
import logging
from pathlib import Path

from lmforge.errors import LmforgeError

log = logging.getLogger("lmforge")


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
    from lmforge.models import build_model, resolve_dtype
    from lmforge.models.config import read_config
    from lmforge.weights.atomic import atomic_dir
    from lmforge.weights.hf_dir import save_model
    from lmforge.weights.peft import load_adapter, merge_adapter, read_adapter_config
    from lmforge.weights.resolve import resolve_model

    resolve_dtype(args.dtype, {})  # reject a bad --dtype before any slow work
    out = Path(args.out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LmforgeError(f"{out} already exists and is not an empty directory; choose another output path")
    adapter = read_adapter_config(args.adapter)  # a wrong adapter fails before the base is loaded
    model_dir = resolve_model(args.base)
    config = read_config(model_dir)
    log.info("loading base model %s", model_dir)
    model = build_model(model_dir, dtype=args.dtype)
    summary = load_adapter(model, args.adapter)
    log.info("adapter %s: rank %d, alpha %g%s%s, %d layers%s", args.adapter, adapter.rank, adapter.alpha,
             ", rsLoRA" if adapter.rslora else "", ", DoRA" if adapter.dora else "", len(summary.adapted),
             f", modules_to_save {', '.join(summary.saved)}" if summary.saved else "")
    merged, config = merge_adapter(model, config)
    with atomic_dir(out) as tmp:  # a half-written merge is never mistaken for a finished one
        save_model(model, config, tmp, source_dir=model_dir, max_shard_bytes=int(args.max_shard_size * 2**30))
    log.info("merged %d layers", merged)
    print(f"wrote {out}")
    return 0
