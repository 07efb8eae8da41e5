"""Training runs on the tiny chat model (tests/unit/conftest.py): YAML configs over the bundled demo chats, and
the metrics a run wrote."""

import json
from collections.abc import Callable
from pathlib import Path

import yaml

ROOT = Path(__file__).parents[1]
DEMO = ROOT / "configs" / "data" / "pirate_demo.jsonl"


def config_maker(folder: Path, model: Path, train: slice, validation: slice, **defaults) -> Callable[..., Path]:
    """make(name, **overrides) writes FOLDER/name.yaml: LoRA on `model` over the demo rows `train` (validation
    rows `validation`), fp32, run directory FOLDER/name. Keys are dotted with `__` (`eval__every_steps=0`);
    `defaults` are overrides every config of this maker gets."""
    lines = DEMO.read_text().splitlines()
    (folder / "train.jsonl").write_text("\n".join(lines[train]) + "\n")
    (folder / "val.jsonl").write_text("\n".join(lines[validation]) + "\n")

    def make(name: str = "run", **overrides) -> Path:
        cfg = {"model": {"path": str(model)}, "method": "lora",
               "lora": {"rank": 4, "alpha": 8, "target_modules": "all-linear"},
               "data": {"train": [{"path": "train.jsonl", "format": "messages"}],
                        "validation": [{"path": "val.jsonl", "format": "messages"}],
                        "max_seq_len": 128, "cache_dir": str(folder / "cache")},
               "optimizer": {"lr": 3e-3}, "precision": "fp32", "output_dir": str(folder / name)}
        for key, value in {**defaults, **overrides}.items():
            node = cfg
            *parents, leaf = key.split("__")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        path = folder / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    return make


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run_dir) if "loss" in r}
