"""Accumulation windows: the micro-batches of one optimizer step, drawn from the data loader epoch after epoch."""

import dataclasses
import math

import numpy as np
import torch

from lmforge.config import TrainConfig
from lmforge.data import IGNORE_INDEX, Batch, Loader, SFTDataset
from lmforge.data.loader import batch_rows


class Windows:
    """`next()` returns the grad_accumulation micro-batches of the next optimizer step (fewer for an epoch's last
    step when the epoch does not divide evenly), on the device. Its state is the loader's, so a resumed run
    continues with exactly the next micro-batch."""

    def __init__(self, dataset: SFTDataset, cfg: TrainConfig, device: torch.device, rank: int = 0,
                 world_size: int = 1):
        self.loader = Loader(dataset, cfg.micro_batch_size, seed=cfg.seed, shuffle=cfg.data.shuffle, rank=rank,
                             world_size=world_size)
        self.size, self.device = cfg.grad_accumulation(world_size), device
        self._batches = None

    @property
    def steps_per_epoch(self) -> int:
        return self.loader.steps_per_epoch(self.size)

    @property
    def epoch(self) -> int:
        return self.loader.epoch

    def next(self) -> list[Batch]:
        window: list[Batch] = []
        while len(window) < self.size:
            if self._batches is None:
                self._batches = iter(self.loader)
            batch = next(self._batches, None)
            if batch is None:  # the epoch is over: its last window may be short; the next one starts a new epoch
                self._batches = None
                if window:
                    break
                continue
            window.append(batch.to(self.device))
        return window

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)
        self._batches = None


def validation_batches(dataset: SFTDataset, micro_batch_size: int, rank: int = 0, world_size: int = 1) -> list[Batch]:
    """This rank's share of the validation set, in order: a contiguous slice of its rows, every row exactly once
    over all ranks. Every rank gets the same number of micro-batches (FSDP's forward is a collective), so a rank
    whose slice is shorter runs a few repeats of its first row with nothing trained in them."""
    per_rank = math.ceil(dataset.num_rows / world_size)
    rows = np.arange(rank * per_rank, min((rank + 1) * per_rank, dataset.num_rows))
    batches = [batch_rows(dataset, rows[i:i + micro_batch_size]) for i in range(0, len(rows), micro_batch_size)]
    filler = batch_rows(dataset, np.zeros(1, dtype=np.int64))
    filler = dataclasses.replace(filler, labels=torch.full_like(filler.labels, IGNORE_INDEX), num_trained_tokens=0)
    return batches + [filler] * (math.ceil(per_rank / micro_batch_size) - len(batches))
