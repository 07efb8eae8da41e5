"""Decode steps replayed from CUDA graphs (vLLM's CUDA graphs; engine/cpu_graph.py is the CPU counterpart).

A decode step of a small model on a GPU is bound by kernel launches: hundreds of small kernels, each launched from
Python. A CUDA graph captures the step's kernels once per batch size and launches them all in one call. Batches are
padded up to the next captured size (1, 2, 4, 8, then steps of 8 up to max_num_seqs, as vLLM does); each step
copies its token ids, positions, cache slots, block tables and context lengths into the static buffers the graph
reads, replays it, and takes its rows of the static output.

What makes the forward capturable: the attention of a decode step reads fixed-shape block tables and builds its masks
on the device from the lengths (layers/attention.py `StaticDecode`), so no shape depends on the step's values and
nothing waits for the host. The tables' width is a power of two of blocks, the smallest that covers the step's
longest context, and part of a graph's key (the attention reads every block of that width: a step of short contexts
does not read max_model_len's worth). Padding rows write their keys and
values into a scratch block that the block manager never hands out. Only decode steps without LoRA are replayed;
everything else (prefill, mixed steps, speculation, multi-LoRA) runs eagerly. Graphs are captured when a batch size
is first met (each costs a warm-up forward and a capture), and dropped when the weights change
(`ModelRunner.refresh`). `enforce_eager` turns them off.
"""

import logging
import time
from collections.abc import Callable

import torch
from torch import nn

from lmforge.layers.attention import AttnMeta, KVCache, StaticDecode

log = logging.getLogger("lmforge")


def graph_sizes(max_num_seqs: int) -> list[int]:
    """The batch sizes captured: 1, 2, 4, 8, then every multiple of 8, up to and including max_num_seqs."""
    sizes = [s for s in (1, 2, 4) if s < max_num_seqs] + list(range(8, max_num_seqs, 8))
    return sizes + [max_num_seqs]


class DecodeGraphs:
    """Decode steps of `model` over the KV pool `kv`, replayed per padded batch size."""

    def __init__(self, model: nn.Module, kv: list[KVCache], max_num_seqs: int, max_blocks: int, scratch_slot: int):
        self.model, self.kv, self.scratch_slot = model, kv, scratch_slot
        self.sizes = graph_sizes(max_num_seqs)
        device = kv[0][0].device
        n = self.sizes[-1]
        self.ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slots = torch.full((n,), scratch_slot, dtype=torch.long, device=device)
        self.tables = torch.zeros(n, max(max_blocks, 1), dtype=torch.long, device=device)
        self.lens = torch.ones(n, dtype=torch.long, device=device)
        self.cu = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.replays: dict[tuple[int, int], Callable[[], torch.Tensor]] = {}  # by (rows, table width)
        self.pool = None  # one memory pool shared by every size's graph

    def meta(self, b: int, width: int) -> AttnMeta:
        """The step metadata of b rows and tables `width` blocks wide over the static buffers (what the captured
        forward reads)."""
        tables = self.tables[:b, :width]
        return AttnMeta(self.cu[: b + 1], (1,) * b, (1,) * b, self.slots[:b], tables,
                        static=StaticDecode(tables, self.lens[:b]))

    def forward(self, b: int, width: int) -> torch.Tensor:
        """The model's forward over the first b rows of the static buffers (final hidden states [b, hidden])."""
        return self.model(self.ids[:b], self.positions[:b], self.meta(b, width), self.kv)

    def capture(self, b: int, width: int) -> Callable[[], torch.Tensor]:
        """Captures the forward; returns what replays it (its output is the graph's static tensor)."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # a warm-up outside the graph: lazy initialisation, library workspaces
            self.forward(b, width)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.forward(b, width)
        self.pool = graph.pool()

        def replay() -> torch.Tensor:
            graph.replay()
            return out
        return replay

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, meta: AttnMeta) -> torch.Tensor | None:
        """The step's final hidden states from a replay, or None when it is not a decode step this can replay."""
        n = len(meta.seqlens_q)
        if meta.lora is not None or n > self.sizes[-1] or meta.num_tokens != n:
            return None
        b = next(s for s in self.sizes if s >= n)
        width = meta.block_tables.shape[1]
        padded = min(1 << (width - 1).bit_length(), self.tables.shape[1])
        if (b, padded) not in self.replays:
            start = time.perf_counter()
            self.replays[b, padded] = self.capture(b, padded)
            log.info("CUDA graph for %d sequences of up to %d blocks captured in %.2fs", b, padded,
                     time.perf_counter() - start)
        self.ids[:n].copy_(ids)
        self.positions[:n].copy_(positions)
        self.slots[:n].copy_(meta.slot_mapping)
        self.tables[:n, :width].copy_(meta.block_tables)  # columns past width: stale ids, masked by the lengths
        self.lens[:n].copy_(torch.tensor(meta.seqlens_k), non_blocking=True)
        if b > n:  # padding rows: token 0 at position 0 into the scratch slot, one key each
            self.ids[n:b].zero_()
            self.positions[n:b].zero_()
            self.slots[n:b].fill_(self.scratch_slot)
            self.tables[n:b].zero_()
            self.lens[n:b].fill_(1)
        return self.replays[b, padded]()[:n]

    def clear(self) -> None:
        """Drops every captured graph (the weights changed); sizes are captured anew when met."""
        self.replays.clear()
        self.pool = None
