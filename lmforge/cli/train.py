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
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="train with N local processes (torchrun --standalone; distributed.strategy picks DDP or "
                        "FSDP). Under torchrun or srun, lmforge joins the job it was started in instead; multi-node "
                        "runs use torchrun's --nnodes and --rdzv-endpoint (docs/training.md)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from lmforge.config import load_config
    from lmforge.errors import LmforgeError
    from lmforge.train import dist
    from lmforge.train.recipes import grpo, sft

    cfg = load_config(args.config, args.overrides)
    if args.nproc < 1:
        raise LmforgeError(f"--nproc must be at least 1, got {args.nproc}")
    if args.nproc > 1:
        if dist.world_from_env().distributed:
            raise LmforgeError("--nproc starts its own processes; this one is already part of a distributed job "
                               "(RANK and WORLD_SIZE are set): drop --nproc")
        cfg.grad_accumulation(args.nproc)  # a batch that does not split fails here, not in N processes
        return dist.launch(args.nproc, ["train", str(args.config), *args.overrides])
    final = (grpo.main if cfg.recipe == "grpo" else sft.main)(cfg)
    if not dist.world_from_env().is_main:
        return 0
    kind = "model" if cfg.method == "full" or cfg.recipe == "reward" else "adapter"
    print(f"run directory: {Path(cfg.output_dir).resolve()}\nfinal {kind}: {final.resolve()}")
    return 0
