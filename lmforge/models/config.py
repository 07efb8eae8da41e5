"""Reading a Hugging Face config.json: the only mapping from HF field names to our model arguments."""

import json
from pathlib import Path

from lmforge.errors import LmforgeError


class MissingConfigKey(LmforgeError):
    """config.json lacks a key the model needs; build_model adds the file's path."""


def need(cfg: dict, key: str):
    if cfg.get(key) is None:
        raise MissingConfigKey(key)
    return cfg[key]


def read_config(model_dir: Path) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise LmforgeError(f"{model_dir} has no config.json; expected a Hugging Face model directory")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LmforgeError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise LmforgeError(f"{path} must hold a JSON object")
    return cfg


def sliding_windows(cfg: dict, num_layers: int) -> list[int | None]:
    """Per-layer sliding window from `layer_types` (transformers v5) or the v4 fields."""
    window = cfg.get("sliding_window")
    if "use_sliding_window" in cfg and not cfg["use_sliding_window"]:
        window = None
    types = cfg.get("layer_types")
    if types is None:
        first = cfg.get("max_window_layers", 0) if "use_sliding_window" in cfg else 0
        types = ["sliding_attention" if window and i >= first else "full_attention" for i in range(num_layers)]
    return [window if t == "sliding_attention" and window else None for t in types]
