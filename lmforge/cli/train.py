"""lmforge train: a YAML recipe (plus key=value overrides) from dataset to a model lmforge serve can load."""

import argparse
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="fine-tune a model from a YAML config",
                       description="Fine-tune (full, LoRA or QLoRA) as CONFIG says. Overrides use dotted keys, e.g. "
                                   "`lmforge train cfg.yaml optimizer.lr=1e-4 lora.rank=8 max_steps=20`. The run "
                                   "directory (output_dir) receives the resolved config, metrics.jsonl, checkpoints "
                                   "and final/; an interrupted run resumes from its latest checkpoint when started "
                                   "again. `lmforge config schema` lists every key.")
    p.add_argument("config", type=Path, help="training YAML (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides of config keys")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from lmforge.config import load_config
    from lmforge.train.recipes import sft

    cfg = load_config(args.config, args.overrides)
    final = sft.main(cfg)
    print(f"run directory: {Path(cfg.output_dir).resolve()}\nfinal {'model' if cfg.method == 'full' else 'adapter'}:"
          f" {final.resolve()}")
    return 0
