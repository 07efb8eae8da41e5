"""lmforge plot RUN_DIR: the loss, reward (grpo) and learning-rate curves of a run, from its metrics.jsonl, as a
PNG."""

import argparse
import json
from pathlib import Path

from lmforge.errors import LmforgeError


def add_parser(sub) -> None:
    p = sub.add_parser("plot", help="draw a run's loss / reward / lr curves as a PNG",
                       description="Read RUN_DIR/metrics.jsonl and write a PNG with the training loss (and "
                                   "validation loss when evaluated), the rollout and held-out rewards of a grpo "
                                   "run, and the learning rate against the step.")
    p.add_argument("run_dir", type=Path, help="a run directory written by `lmforge train`")
    p.add_argument("--output", "-o", type=Path, help="PNG path (default RUN_DIR/curves.png)")
    p.set_defaults(run=run)


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise LmforgeError(f"{path} does not exist; is {run_dir} a run directory of `lmforge train`?")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise LmforgeError(f"{path}:{number}: invalid JSON ({e.msg})") from None
    return records


def run(args: argparse.Namespace) -> int:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise LmforgeError("lmforge plot needs matplotlib: pip install 'lmforge[plot]'") from None
    records = read_metrics(args.run_dir)
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    if not train:
        raise LmforgeError(f"{args.run_dir / 'metrics.jsonl'} holds no training steps yet")
    rollouts = [r for r in records if "reward" in r]
    held_out = [r for r in records if "val_reward" in r]
    rewards = bool(rollouts or held_out)  # recipe grpo: a reward panel between loss and learning rate
    fig, axes = plt.subplots(3 if rewards else 2, 1, figsize=(8, 8 if rewards else 6), sharex=True,
                             height_ratios=(3, 2, 1) if rewards else (3, 1))
    top, bottom = axes[0], axes[-1]
    if rewards:
        middle = axes[1]
        if rollouts:
            middle.plot([r["step"] for r in rollouts], [r["reward"] for r in rollouts], label="rollout reward")
        if held_out:
            middle.plot([r["step"] for r in held_out], [r["val_reward"] for r in held_out], "o-",
                        label="held-out reward")
        middle.set_ylabel("reward")
        middle.legend()
        middle.grid(alpha=0.3)
    top.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if val:
        top.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss")
    top.set_ylabel("loss")
    top.legend()
    top.grid(alpha=0.3)
    bottom.plot([r["step"] for r in train], [r["lr"] for r in train], color="tab:orange")
    bottom.set_ylabel("learning rate")
    bottom.set_xlabel("optimizer step")
    bottom.grid(alpha=0.3)
    fig.suptitle(str(args.run_dir))
    fig.tight_layout()
    out = args.output or args.run_dir / "curves.png"
    fig.savefig(out, dpi=100)
    print(out)
    return 0
