"""Model + tokenizer loading shared by the commands that run a model."""

import argparse
import logging
import time

from lmforge.weights.resolve import DEFAULT_MODEL

log = logging.getLogger("lmforge")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=DEFAULT_MODEL,
                   help=f"model directory, .gguf file, Hub id (org/name) or alias (default: {DEFAULT_MODEL})")
    p.add_argument("--dtype", default="auto", help="weight and compute dtype: auto (the checkpoint's own), "
                   "float32, bfloat16 or float16")


def load(args: argparse.Namespace):
    from lmforge.models import build_model, resolve_dtype
    from lmforge.tokenizer import Tokenizer
    from lmforge.weights.resolve import resolve_model

    start = time.perf_counter()
    resolve_dtype(args.dtype, {})  # reject a bad --dtype before any slow work
    model_dir = resolve_model(args.model)
    model = build_model(model_dir, dtype=args.dtype)
    tokenizer = Tokenizer.from_dir(model_dir)
    log.info("loaded %s in %.1fs", model_dir, time.perf_counter() - start)
    return model, tokenizer
