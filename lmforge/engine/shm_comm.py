"""All-reduce and all-gather between the tensor-parallel processes of one machine through shared memory.

gloo's TCP loopback costs about a millisecond per collective on a 2-core machine (each wait puts a thread to sleep
and wakes it again), and a decode step of SmolLM2 needs 61 of them: 66 ms of an 87 ms step (benchmarks/
tensor_parallel.py). Here each rank copies its tensor into its slot of a shared buffer, publishes a sequence number,
and spins (yielding the core) until every rank has published; each then reads all slots and adds them in rank order,
so every rank gets the same bits. Two buffer sets alternate between calls: a rank can be at most one call ahead of
the slowest (it waits for everyone's number at the end of each call), so the set it writes is never one still read.
x86 orders stores with stores and loads with loads (TSO), which is what publishing after copying needs; other CPUs use
gloo. A tensor larger than a slot goes through gloo (every rank decides alike: the shapes are the same everywhere).
Where lmforge's CPU kernels are built, the all-reduce is their `shm_all_reduce` (kernels/shm_collective.cpp: the
same protocol, the sum in float32 in rank order, the wait with the GIL released), which a step graph can record and
replay; the sequence number lives in a tensor both paths share.
"""

import os
import platform
import time
from multiprocessing import shared_memory

import numpy as np
import torch
import torch.distributed as dist

from lmforge import kernels

SLOT_BYTES = 32 * 2**20  # per rank and buffer set: 8M float32 values (a 2048-token step of a 4096-wide model)
HEADER = 64  # bytes per rank for its sequence number, a cache line each
CHECK_EVERY = 0.05  # s between checks that the other processes still exist, while waiting


def usable() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def create(world: int) -> shared_memory.SharedMemory:
    """Rank 0 makes the segment before it starts the workers (they attach by name)."""
    shm = shared_memory.SharedMemory(create=True, size=world * HEADER + 2 * world * SLOT_BYTES)
    np.frombuffer(shm.buf, dtype=np.int64, count=world * HEADER // 8)[:] = 0
    return shm


class ShmComm:
    def __init__(self, name: str, rank: int, world: int, alive, watch: list[int]):
        """alive(): False once a process of the group is gone (the wait then fails instead of spinning forever);
        watch: the same for the kernel, as process ids that must exist (-pid: must be this process's parent)."""
        self.shm = shared_memory.SharedMemory(name=name)
        self.rank, self.world, self.alive = rank, world, alive
        self.header = torch.frombuffer(self.shm.buf, dtype=torch.int64, count=world * HEADER // 8)
        self.seqs = self.header.numpy()[:: HEADER // 8]
        self.data = torch.frombuffer(self.shm.buf, dtype=torch.uint8, offset=world * HEADER,
                                     count=2 * world * SLOT_BYTES).view(2, world, SLOT_BYTES)
        self.state = torch.tensor([0, rank], dtype=torch.int64)  # the last sequence number used, this rank
        self.watch = torch.tensor(watch, dtype=torch.int64)

    def tensors(self) -> list[torch.Tensor]:
        """What the kernel reads besides its input (a step graph's recording must know them)."""
        return [self.data, self.header, self.state, self.watch]

    def _exchange(self, x: torch.Tensor) -> torch.Tensor | None:
        """Every rank's x as [world, *x.shape] (a view of the shared buffer, valid until the next call but one);
        None when x does not fit a slot."""
        nbytes = x.numel() * x.element_size()
        if nbytes > SLOT_BYTES:
            return None
        self.state[0] += 1
        seq = int(self.state[0])
        slots = self.data[seq % 2, :, :nbytes].view(x.dtype).view(self.world, *x.shape)
        slots[self.rank].copy_(x)
        self.seqs[self.rank] = seq  # published after the copy (x86 keeps stores in order)
        last = time.monotonic()
        while self.seqs.min() < seq:
            os.sched_yield()
            if time.monotonic() - last > CHECK_EVERY:
                if not self.alive():
                    raise RuntimeError("a tensor-parallel process is gone (shared-memory collective)")
                last = time.monotonic()
        return slots

    def all_reduce(self, x: torch.Tensor) -> None:
        ops = kernels.usable(x)
        if ops is not None and x.is_contiguous() and x.numel() * x.element_size() <= SLOT_BYTES:
            ops.shm_all_reduce(x, self.data, self.header, self.state, self.watch)
            return
        slots = self._exchange(x.contiguous())
        if slots is None:
            dist.all_reduce(x)
        else:
            torch.sum(slots, dim=0, out=x)

    def all_gather(self, parts: list[torch.Tensor], x: torch.Tensor) -> None:
        slots = self._exchange(x.contiguous())
        if slots is None:
            dist.all_gather(parts, x)
        else:
            for part, slot in zip(parts, slots, strict=True):
                part.copy_(slot)

    def close(self) -> None:
        self.data = self.seqs = self.header = None
        self.shm.close()
