"""lmforge convert SRC DST: GGUF -> HF directory, or HF -> HF with a dtype cast and resharding, or (--quantize) a
quantised checkpoint the engine serves with int8/int4 linears."""

import argparse
from pathlib import Path

from lmforge.errors import LmforgeError


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="convert a GGUF file or HF model to an HF directory",
                       description="Convert a GGUF file (llama family) or a Hugging Face model directory into a "
                                   "Hugging Face directory (config.json, safetensors, tokenizer files).")
    p.add_argument("src", help="a .gguf file, an HF model directory, an alias, or a Hub id")
    p.add_argument("dst", help="output directory (must not exist or be empty)")
    p.add_argument("--dtype", default="auto", help="dtype of the written weights: auto (float32 for GGUF, the "
                   "source's dtype for HF), float32, bfloat16 or float16")
    p.add_argument("--quantize", choices=("int8", "int4"), default=None,
                   help="write weight-only quantised linears (int8 per 32-block, int4 per 32-group; lm_head int8) "
                   "that the engine serves as they are (layout: lmforge/weights/quantized.py)")
    p.add_argument("--max-shard-size", type=float, default=5.0, metavar="GIB",
                   help="split the weights into shards of at most this many GiB (default 5)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from lmforge.models import build_model, resolve_dtype
    from lmforge.models.config import read_config
    from lmforge.weights.gguf_import import convert_gguf
    from lmforge.weights.hf_dir import save_model
    from lmforge.weights.quantized import quantize_model, save_quantized
    from lmforge.weights.resolve import resolve_model

    resolve_dtype(args.dtype, {})  # reject a bad --dtype before any slow work
    src, dst = Path(args.src).expanduser(), Path(args.dst).expanduser()
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise LmforgeError(f"{dst} already exists and is not an empty directory; choose another output path")
    if args.quantize:
        model_dir = resolve_model(args.src)
        model = build_model(model_dir, dtype=args.dtype)
        quantize_model(model, args.quantize)
        save_quantized(model, read_config(model_dir), args.quantize, dst, source_dir=model_dir)
    elif src.suffix == ".gguf" and src.is_file():
        convert_gguf(src, dst, dtype=args.dtype)
    else:
        model_dir = resolve_model(args.src)
        model = build_model(model_dir, dtype=args.dtype)
        save_model(model, read_config(model_dir), dst, source_dir=model_dir,
                   max_shard_bytes=int(args.max_shard_size * 2**30))
    print(f"wrote {dst}")
    return 0
