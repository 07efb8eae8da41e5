"""Micro-batches for the training loop, with state for exact resumption and a disjoint shard per rank.

An epoch's order is a permutation of the dataset's rows, drawn from (seed, epoch) (or the rows in order without
shuffling). With several ranks the order is first extended by repeating its head until it divides evenly (as
torch's DistributedSampler does), and rank r takes every world_size-th row from r on: the shards are disjoint within
the epoch's order, cover all of it, and give every rank the same number of micro-batches (DDP needs that). A
micro-batch is micro_batch_size consecutive rows of the shard (the last one of an epoch may hold fewer) laid end to
end, each sample of each row its own document:

    batch = next(iter(loader))
    hidden = model(batch.input_ids, batch.positions, AttnMeta.for_training(batch.cu_seqlens))
    loss_sum = cross_entropy(model.logits(hidden), batch.labels, ignore_index=IGNORE_INDEX, reduction="sum")

and the loss is normalised by the sum of num_trained_tokens over the accumulation window (and ranks).
`for batch in loader` runs the rest of the current epoch; the next loop starts the next epoch. state_dict() counts
the rows of the epoch's order handed out so far on all ranks together, so a loader restored from it — with the same
or another number of ranks — continues with exactly the next rows.
"""

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from lmforge.data.dataset import IGNORE_INDEX, KTODataset, PairDataset, SFTDataset
from lmforge.errors import LmforgeError


@dataclass(frozen=True, slots=True)
class Batch:
    """One flat micro-batch: no padding; documents laid end to end."""

    input_ids: torch.Tensor  # int64 [T]
    positions: torch.Tensor  # int64 [T], from 0 in each document
    cu_seqlens: torch.Tensor  # int32 [num_documents + 1], document boundaries
    labels: torch.Tensor  # int64 [T]: the token to predict at each position, IGNORE_INDEX where not trained
    num_trained_tokens: int  # labels != IGNORE_INDEX
    # int32 [num_documents]: how many first tokens of the previous document each one attends to before its own
    # (a preference pair's shared prompt, data/dataset.py Document.prefix); None: every document stands alone
    prefix_lens: torch.Tensor | None = None
    desirable: torch.Tensor | None = None  # bool [rows]: a KTODataset batch's row labels, in row order

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    def sequence_lengths(self) -> torch.Tensor:
        """Each document's tokens plus the shared prefix it attends to: the length of the sequence it stands for."""
        lengths = self.cu_seqlens[1:] - self.cu_seqlens[:-1]
        return lengths if self.prefix_lens is None else lengths + self.prefix_lens.to(lengths.device)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        maybe = lambda t: None if t is None else move(t)  # noqa: E731
        return Batch(move(self.input_ids), move(self.positions), move(self.cu_seqlens), move(self.labels),
                     self.num_trained_tokens, maybe(self.prefix_lens), maybe(self.desirable))


def join_batches(batches: list[Batch]) -> Batch:
    """The micro-batches end to end as one flat batch, their documents in order (a first document never continues
    a prefix, so every document keeps what it attends to)."""
    if len(batches) == 1:
        return batches[0]
    cat = lambda ts: torch.cat(ts) if ts[0] is not None else None  # noqa: E731
    offsets = torch.tensor([0] + [b.num_tokens for b in batches[:-1]]).cumsum(0)
    cu_seqlens = torch.cat([batches[0].cu_seqlens[:1]] + [b.cu_seqlens[1:] + int(o) for b, o in
                                                          zip(batches, offsets, strict=True)])
    prefixes = None
    if any(b.prefix_lens is not None for b in batches):
        prefixes = torch.cat([b.prefix_lens if b.prefix_lens is not None else
                              torch.zeros(len(b.cu_seqlens) - 1, dtype=torch.int32, device=b.cu_seqlens.device)
                              for b in batches])
    return Batch(cat([b.input_ids for b in batches]), cat([b.positions for b in batches]), cu_seqlens,
                 cat([b.labels for b in batches]), sum(b.num_trained_tokens for b in batches), prefixes,
                 cat([b.desirable for b in batches]))


def make_batch(dataset: SFTDataset | PairDataset | KTODataset, rows: np.ndarray) -> Batch:
    """The flat batch of the given rows of `dataset`: every document of every row, end to end (with the rows'
    labels for a KTODataset)."""
    documents = dataset.documents(rows)
    tokens = np.concatenate([d.tokens for d in documents]).astype(np.int64)
    labels = np.concatenate([d.labels for d in documents])
    lengths = np.array([len(d.tokens) for d in documents], dtype=np.int64)
    prefixes = np.array([d.prefix for d in documents], dtype=np.int64)
    cu_seqlens = np.zeros(len(documents) + 1, dtype=np.int32)
    cu_seqlens[1:] = np.cumsum(lengths)
    # a document that continues a shared prefix starts at the position after it
    positions = np.arange(len(tokens), dtype=np.int64) - np.repeat(cu_seqlens[:-1] - prefixes, lengths)
    prefix_lens = torch.from_numpy(prefixes.astype(np.int32)) if prefixes.any() else None
    desirable = torch.from_numpy(dataset.desirable(rows)) if isinstance(dataset, KTODataset) else None
    return Batch(torch.from_numpy(tokens), torch.from_numpy(positions), torch.from_numpy(cu_seqlens),
                 torch.from_numpy(labels), int((labels != IGNORE_INDEX).sum()), prefix_lens, desirable)


def micro_batches_per_epoch(num_rows: int, micro_batch_size: int, world_size: int = 1) -> int:
    """Micro-batches each rank runs per epoch."""
    return math.ceil(math.ceil(num_rows / world_size) / micro_batch_size)


def steps_per_epoch(num_rows: int, micro_batch_size: int, grad_accumulation: int, world_size: int = 1) -> int:
    """Optimizer steps per epoch, counting a last step that accumulates fewer micro-batches."""
    return math.ceil(micro_batches_per_epoch(num_rows, micro_batch_size, world_size) / grad_accumulation)


class Loader:
    """Iterates one rank's micro-batches of an SFTDataset, PairDataset or KTODataset, epoch after epoch,
    deterministically."""

    def __init__(self, dataset: SFTDataset | PairDataset | KTODataset, micro_batch_size: int, seed: int = 0,
                 shuffle: bool = True, rank: int = 0, world_size: int = 1):
        if not isinstance(dataset, (SFTDataset, PairDataset, KTODataset)):
            raise LmforgeError(f"the loader batches laid-out datasets (SFTDataset, PairDataset, KTODataset); got "
                               f"{type(dataset).__name__}")
        if micro_batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need micro_batch_size >= 1 and 0 <= rank < world_size, got {micro_batch_size}, "
                             f"rank {rank}, world_size {world_size}")
        if dataset.num_rows == 0:
            raise LmforgeError("the dataset has no samples to batch")
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.position = 0  # micro-batches of this epoch already handed out

    def __len__(self) -> int:
        return micro_batches_per_epoch(self.dataset.num_rows, self.micro_batch_size, self.world_size)

    def steps_per_epoch(self, grad_accumulation: int) -> int:
        return math.ceil(len(self) / grad_accumulation)

    def shard(self, epoch: int) -> np.ndarray:
        """This rank's rows for `epoch`, in the order they are batched."""
        n = self.dataset.num_rows
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(n)
        else:
            order = np.arange(n)
        padded = np.resize(order, math.ceil(n / self.world_size) * self.world_size)  # repeats the head
        return padded[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[Batch]:
        if self.position >= len(self):  # the previous loop finished its epoch
            self.epoch, self.position = self.epoch + 1, 0
        shard = self.shard(self.epoch)
        while self.position < len(self):
            start = self.position * self.micro_batch_size
            self.position += 1  # counted as handed out before the caller sees it: state_dict() names the next one
            yield make_batch(self.dataset, shard[start : start + self.micro_batch_size])

    def state_dict(self) -> dict:
        """Where the run is, independent of how many ranks share it: the epoch and how many rows of the epoch's
        order all ranks have consumed together (a resume with another world size continues from that row)."""
        done = self.position >= len(self)
        rows = min(self.position * self.micro_batch_size, len(self.shard(self.epoch))) * self.world_size
        return {"epoch": self.epoch, "rows_done": rows, "epoch_done": done, "seed": self.seed,
                "shuffle": self.shuffle, "num_rows": self.dataset.num_rows}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("seed", "shuffle", "num_rows"):
            if key in state and state[key] != mine[key]:
                raise LmforgeError(f"cannot resume the data loader: the checkpoint's {key} is {state[key]!r}, this "
                                   f"run's is {mine[key]!r}; resume with the same data and batch settings")
        self.epoch = int(state["epoch"])
        if state["epoch_done"]:
            self.position = len(self)
            return
        per_batch = self.micro_batch_size * self.world_size
        if state["rows_done"] % per_batch:
            raise LmforgeError(f"cannot resume the data loader: {state['rows_done']} rows of epoch {self.epoch} were "
                               f"consumed, not a whole number of micro-batches of {self.micro_batch_size} rows on "
                               f"each of {self.world_size} processes; resume with a micro-batch size and process "
                               "count that divide it")
        self.position = state["rows_done"] // per_batch

