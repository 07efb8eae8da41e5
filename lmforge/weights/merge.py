"""Folding a PEFT adapter into its base model and writing the result as a Hugging Face directory (`lmforge merge`)."""

import logging
from pathlib import Path

from lmforge.errors import LmforgeError

log = logging.getLogger("lmforge")


def merge_to_dir(base: str, adapter: str | Path, out: str | Path, dtype: str = "auto",
                 max_shard_bytes: int = 5 * 2**30) -> int:
    """Loads `base` (directory, .gguf, alias or Hub id) in `dtype`, merges the adapter into it (each weight computed
    in float32, rounded once) and writes an HF directory at `out`, which appears whole or not at all; returns how
    many layers were merged. `out` must not exist or be an empty directory."""
    from lmforge.models import build_model, resolve_dtype
    from lmforge.models.config import read_config
    from lmforge.weights.atomic import atomic_dir
    from lmforge.weights.hf_dir import save_model
    from lmforge.weights.peft import load_adapter, merge_adapter, read_adapter_config
    from lmforge.weights.resolve import resolve_model

    resolve_dtype(dtype, {})  # reject a bad dtype before any slow work
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LmforgeError(f"{out} already exists and is not an empty directory; choose another output path")
    cfg = read_adapter_config(adapter)  # a wrong adapter fails before the base is loaded
    model_dir = resolve_model(base)
    log.info("loading base model %s", model_dir)
    model = build_model(model_dir, dtype=dtype)
    summary = load_adapter(model, adapter)
    log.info("adapter %s: rank %d, alpha %g%s%s, %d layers%s", adapter, cfg.rank, cfg.alpha,
             ", rsLoRA" if cfg.rslora else "", ", DoRA" if cfg.dora else "", len(summary.adapted),
             f", modules_to_save {', '.join(summary.saved)}" if summary.saved else "")
    merged, config = merge_adapter(model, read_config(model_dir))
    with atomic_dir(out) as tmp:  # a half-written merge is never mistaken for a finished one
        save_model(model, config, tmp, source_dir=model_dir, max_shard_bytes=max_shard_bytes)
    log.info("merged %d layers", merged)
    return merged
