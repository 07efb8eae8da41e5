"""Checkpoints of a run directory, written atomically: everything goes into a temporary directory that is renamed
into place once complete, so a crash or kill mid-save leaves the previous checkpoint as the latest good one.

    RUN/checkpoints/step-000010/   model files (PEFT adapter or HF directory) + trainer_state.pt
    RUN/best/, RUN/final/          model files only
"""

import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from lmforge.errors import LmforgeError

STATE_FILE = "trainer_state.pt"
_STEP_DIR = re.compile(r"step-(\d+)")


def write_atomically(target: Path, fill: Callable[[Path], None]) -> Path:
    """fill(tmp) writes the directory's content; then tmp replaces target in one rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    fill(tmp)
    for path in tmp.iterdir():  # data on disk before the rename makes it visible
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, step: int, save_model: Callable[[Path], None], trainer_state: dict,
                    keep_last: int) -> Path:
    """checkpoints/step-N with the model files and the trainer state; prunes all but the newest keep_last."""

    def fill(tmp: Path) -> None:
        save_model(tmp)
        torch.save(trainer_state, tmp / STATE_FILE)

    path = write_atomically(Path(run_dir) / "checkpoints" / f"step-{step:06d}", fill)
    for old in checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary directories of interrupted saves are skipped)."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_DIR.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def load_trainer_state(checkpoint: Path) -> dict:
    path = Path(checkpoint) / STATE_FILE
    if not path.is_file():
        raise LmforgeError(f"{checkpoint} is not a training checkpoint: {STATE_FILE} is missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which one
        raise LmforgeError(f"{path} cannot be read ({type(e).__name__}: {e}); resume from another checkpoint "
                           f"(checkpoint.resume=PATH) or start over (checkpoint.resume=never)") from None
