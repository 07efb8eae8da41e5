"""Checkpoints of a run directory, written atomically: everything goes into a temporary directory that is renamed
into place once complete, so a crash or kill mid-save leaves the previous checkpoint as the latest good one.

    RUN/checkpoints/step-000010/   model files (PEFT adapter or HF directory; not for sharded full fine-tuning)
                                   + state/ (trained weights and optimizer state, torch.distributed.checkpoint)
                                   + trainer_state.pt (schedule, data position, RNG, progress)
    RUN/best/, RUN/final/          model files only

state/ is written by every rank in parallel, each its own shards, and read back into any number of ranks: DCP
stores each tensor's global shape, so a run saved by 2 processes resumes in 1 and the other way round.
"""

import contextlib
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from lmforge.errors import LmforgeError
from lmforge.weights.atomic import atomic_dir, staging_dir

STATE_FILE = "trainer_state.pt"
STATE_DIR = "state"
_STEP_DIR = re.compile(r"step-(\d+)")


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


def save_checkpoint(run_dir: Path, step: int, save_model: Callable[[Path], None] | None, model: nn.Module,
                    optimizer: torch.optim.Optimizer, trainer_state: dict, keep_last: int, is_main: bool = True,
                    barrier: Callable[[], None] = lambda: None) -> Path:
    """checkpoints/step-N with the model files (unless save_model is None), the sharded training state and the
    trainer state; prunes all but the newest keep_last. Every rank calls it: all write state/ into the main rank's
    temporary directory, which the main rank then completes and renames."""
    target = Path(run_dir) / "checkpoints" / f"step-{step:06d}"
    # a failed save leaves its temporary directory, as a kill would; the next save of this step starts it afresh
    publish = atomic_dir(target, durable=True, shared=True, keep_on_error=True) if is_main else \
        contextlib.nullcontext(staging_dir(target, shared=True))
    with publish as tmp:
        barrier()
        dcp.save(_training_state(model, optimizer), checkpoint_id=tmp / STATE_DIR, no_dist=_single())
        if save_model is not None:
            save_model(tmp)  # a collective under FSDP (gathers the weights); only the main rank writes
        barrier()
        if is_main:
            torch.save(trainer_state, tmp / STATE_FILE)
    if is_main:
        for old in checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return target


def load_training_state(checkpoint: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Restores state/ into this rank's model and optimizer (their shards, whatever world size wrote it)."""
    folder = Path(checkpoint) / STATE_DIR
    if not folder.is_dir():
        raise LmforgeError(f"{checkpoint} is not a training checkpoint: {STATE_DIR}/ is missing")
    state = _training_state(model, optimizer)
    try:
        dcp.load(state, checkpoint_id=folder, no_dist=_single())
    except (Exception, CheckpointException) as e:  # truncated, foreign, or of another model / method (DCP's
        # CheckpointException is a BaseException, wrapping each failed rank's own exception)
        if isinstance(e, CheckpointException) and e.failures:
            e = next(iter(e.failures.values()))
            e = e[0] if isinstance(e, tuple) else e
        why = f"{type(e).__name__}: {str(e).splitlines()[0]}" if str(e) else type(e).__name__
        raise LmforgeError(f"{folder} cannot be restored into this run ({why}); resume from another checkpoint "
                           "(checkpoint.resume=PATH) or start over (checkpoint.resume=never)") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=_LOAD)


_OPTIONS = StateDictOptions(ignore_frozen_params=True)  # the frozen base is the model's own files, not the run's
_LOAD = StateDictOptions(ignore_frozen_params=True, strict=False)  # dcp.load has already matched every saved key


def _single() -> bool:
    return not torch.distributed.is_initialized()


def _training_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    model_state, optimizer_state = get_state_dict(model, optimizer, options=_OPTIONS)
    return {"model": model_state, "optimizer": optimizer_state}


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
