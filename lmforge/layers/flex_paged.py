"""A paged step's attention in one FlexAttention call (the GPU path of issue 23; engine steps on CUDA that are not
replayed decode graphs). The queries of every sequence of the step, laid end to end, attend to the paged KV pool in
place, with no gather: a mask over the pool's physical slots lets a query see a slot when the slot's block is in its
sequence's block table at logical index j and the slot's position in the sequence, j * block_size + offset, is at
most the query's (and inside the layer's sliding window). Blocks shared by prefix caching are seen by every sequence
whose table holds them. FlexAttention skips the (128 x 128) tiles the mask leaves empty, so a query tile reads only
the blocks of its own sequences.

On CUDA the call is compiled (torch.compile, shapes dynamic; the first step of a new kind pays for it); elsewhere
FlexAttention runs its unfused reference, which materialises the scores: the CPU tests use it to check the masks,
the engine's CPU steps never do (they have their own kernels). Unlike the gathering paths, a masked slot inside a
tile that is read is not zeroed first: a pool slot holding a NaN (a former owner's) would reach the output; the
pool starts zeroed and finite models write finite keys and values.
"""

from dataclasses import dataclass, field

import torch

DEVICES = ("cuda",)  # where the engine attends paged steps this way (tests add "cpu")


def enabled(device: torch.device) -> bool:
    if device.type not in DEVICES:
        return False
    try:
        import torch.nn.attention.flex_attention  # noqa: F401 (torch >= 2.5)
    except ImportError:
        return False
    return True


@dataclass(slots=True)
class FlexStep:
    """What the mask of one step reads, built once per step and shared by its layers; the block masks themselves are
    made on first use per sliding window (layers may differ)."""

    seq_of_q: torch.Tensor  # [T] the sequence of each query token
    pos_of_q: torch.Tensor  # [T] its position in that sequence
    logical: torch.Tensor  # [S, num_blocks] index of each physical block in each sequence's table, -1 if absent
    block_size: int
    num_slots: int
    masks: dict = field(default_factory=dict)  # window -> BlockMask

    @classmethod
    def build(cls, seqlens_q: list[int], seqlens_k: list[int], block_tables: torch.Tensor, num_blocks: int,
              block_size: int) -> "FlexStep":
        device = block_tables.device
        lens_q = torch.tensor(seqlens_q, device=device)
        lens_k = torch.tensor(seqlens_k, device=device)
        seqs = len(seqlens_q)
        seq_of_q = torch.repeat_interleave(torch.arange(seqs, device=device), lens_q)
        starts = torch.cumsum(lens_q, 0) - lens_q
        pos_of_q = torch.arange(int(lens_q.sum()), device=device) - starts[seq_of_q] + (lens_k - lens_q)[seq_of_q]
        width = block_tables.shape[1]
        used = torch.arange(width, device=device)[None, :] < (lens_k[:, None] + block_size - 1) // block_size
        logical = torch.full((seqs, num_blocks), -1, dtype=torch.long, device=device)
        rows = torch.arange(seqs, device=device)[:, None].expand(seqs, width)
        cols = torch.arange(width, device=device)[None, :].expand(seqs, width)
        logical[rows[used], block_tables.long()[used]] = cols[used]
        return cls(seq_of_q, pos_of_q, logical, block_size, num_blocks * block_size)

    def block_mask(self, window: int | None):
        if window not in self.masks:
            from torch.nn.attention.flex_attention import create_block_mask

            seq_of_q, pos_of_q, logical, bs = self.seq_of_q, self.pos_of_q, self.logical, self.block_size

            def visible(b, h, q, kv):
                j = logical[seq_of_q[q], kv // bs]
                pos = j * bs + kv % bs
                ok = (j >= 0) & (pos <= pos_of_q[q])
                return ok & (pos_of_q[q] - pos < window) if window is not None else ok

            self.masks[window] = create_block_mask(visible, None, None, len(seq_of_q), self.num_slots,
                                                   device=seq_of_q.device)
        return self.masks[window]


_compiled = {}


def _flex():
    """flex_attention, compiled once per process on CUDA."""
    from torch.nn.attention.flex_attention import flex_attention

    if "fn" not in _compiled:
        _compiled["fn"] = torch.compile(flex_attention, dynamic=True) if torch.cuda.is_available() else flex_attention
    return _compiled["fn"]


def flex_paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, step: FlexStep,
                         scale: float, window: int | None) -> torch.Tensor:
    """q [T, H, D] (the step's new tokens, their keys and values already written) -> [T, H, D]."""
    kvh, dim = k_cache.shape[2], k_cache.shape[3]
    keys = k_cache.view(-1, kvh, dim).transpose(0, 1)[None]  # [1, KVH, slots, D], the pool in place
    values = v_cache.view(-1, kvh, dim).transpose(0, 1)[None]
    from torch.nn.attention.flex_attention import flex_attention

    fn = _flex() if q.is_cuda else flex_attention
    out = fn(q.transpose(0, 1)[None], keys, values, block_mask=step.block_mask(window), scale=scale,
             enable_gqa=q.shape[1] != kvh)
    return out[0].transpose(0, 1)
