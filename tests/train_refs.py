"""Training runs on the tiny chat model (tests/unit/conftest.py): YAML configs over the bundled demo chats, and
the metrics a run wrote."""

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import yaml

ROOT = Path(__file__).parents[1]
DEMO = ROOT / "configs" / "data" / "pirate_demo.jsonl"


def config_maker(folder: Path, model: Path, train: slice, validation: slice, pairs: bool = False,
                 **defaults) -> Callable[..., Path]:
    """make(name, **overrides) writes FOLDER/name.yaml: LoRA on `model` over the demo rows `train` (validation
    rows `validation`), fp32, run directory FOLDER/name. Keys are dotted with `__` (`eval__every_steps=0`);
    `defaults` are overrides every config of this maker gets. With `pairs` the rows become preference pairs
    (recipe: dpo): the pirate answer chosen over the next row's answer."""
    lines = DEMO.read_text().splitlines()
    if pairs:
        lines = pair_rows(lines)
    (folder / "train.jsonl").write_text("\n".join(lines[train]) + "\n")
    (folder / "val.jsonl").write_text("\n".join(lines[validation]) + "\n")
    data_format = "preference" if pairs else "messages"

    def make(name: str = "run", **overrides) -> Path:
        cfg = {"model": {"path": str(model)}, "method": "lora",
               "lora": {"rank": 4, "alpha": 8, "target_modules": "all-linear"},
               **({"recipe": "dpo"} if pairs else {}),
               "data": {"train": [{"path": "train.jsonl", "format": data_format}],
                        "validation": [{"path": "val.jsonl", "format": data_format}],
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


def pair_rows(chat_lines: list[str]) -> list[str]:
    """Demo chats as {"prompt", "chosen", "rejected"} rows: each answer is chosen over the next row's."""
    chats = [json.loads(line)["messages"] for line in chat_lines]
    return [json.dumps({"prompt": chat[0]["content"], "chosen": chat[1]["content"],
                        "rejected": chats[(i + 1) % len(chats)][1]["content"]}) for i, chat in enumerate(chats)]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run_dir) if "loss" in r}


def train_until_killed(config: Path, run: Path, step: int, timeout: float = 120) -> int:
    """Runs `lmforge train config` in a child process, SIGKILLs it once metrics.jsonl holds `step`, and returns
    the last step it logged."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", "-q", "train", str(config)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").is_file() and any(s >= step for s in losses(run)):
            break
        time.sleep(0.01)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()}"
    proc.kill()
    proc.wait()
    return max(losses(run))


def assert_window_equals_one_batch(model, cfg, objective, dataset, names: set[str], abs_tol: float = 1e-6):
    """One optimizer step over 4 micro-batches of one row each and one over the same 4 rows as one batch give the
    same summary (`names` exactly, each within rel 1e-6 or `abs_tol`) and the same gradient of every trained weight;
    returns the joined batch, the summary and the gradients."""
    import pytest
    import torch

    from lmforge.data import Loader
    from lmforge.train.recipes import sft
    from tests.unit.test_train_step import KeepGrads

    opt = KeepGrads([p for p in model.parameters() if p.requires_grad])
    small, _ = sft.train_step(model, list(Loader(dataset, 1, shuffle=False))[:4], cfg, opt, None,
                              objective=objective)
    small_grads = opt.seen
    joined = next(iter(Loader(dataset, 4, shuffle=False)))
    big, _ = sft.train_step(model, [joined], cfg, opt, None, objective=objective)
    assert small.keys() == big.keys() == names
    for name in small:
        assert small[name] == pytest.approx(big[name], rel=1e-6, abs=abs_tol), name
    for a, b in zip(small_grads, opt.seen, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    return joined, small, small_grads


def killed_and_resumed(make_config: Callable[..., Path], steps: int = 12, kill_at: int = 7) -> tuple[Path, Path]:
    """The run directories of a run without interruption and of the same run SIGKILLed after `kill_at` steps and
    resumed (checkpoints every 3 steps, LoRA dropout on, so the RNG state must resume too)."""
    from lmforge.config import load_config
    from lmforge.train.recipes import sft

    settings = {"max_steps": steps, "eval__every_steps": 0, "checkpoint__every_steps": 3, "lora__dropout": 0.1}
    baseline = load_config(make_config("baseline", **settings))
    sft.main(baseline)
    killed = make_config("killed", **settings)
    run = Path(load_config(killed).output_dir)
    done = train_until_killed(killed, run, kill_at)
    assert kill_at <= done < steps
    sft.main(load_config(killed))  # resume: checkpoint.resume is auto
    assert [r["step"] for r in metrics(run) if "loss" in r] == list(range(1, steps + 1))
    return Path(baseline.output_dir), run


def build_run(path: Path):
    """(config, trainable model, model directory, datasets) of the training YAML at `path`, as a run builds them."""
    import torch

    from lmforge.config import load_config
    from lmforge.data import build_datasets
    from lmforge.train.model import build_trainable

    cfg = load_config(path)
    torch.manual_seed(cfg.seed)
    model, tokenizer, model_dir = build_trainable(cfg, torch.device("cpu"))
    return cfg, model, model_dir, build_datasets(cfg.data, tokenizer, cfg.seed)
