"""Attention through FlexAttention on the GPU (issue 23): a paged engine step in one call (`FlexStep`), and packed
training documents in one call, backward included (`FlexDocs`).

Paged steps (engine steps on CUDA that are not replayed decode graphs). The queries of every sequence of the step,
laid end to end, attend to the paged KV pool in place, with no gather: a mask over the pool's physical slots lets a
query see a slot when the slot's block is in its sequence's block table at logical index j and the slot's position
in the sequence, j * block_size + offset, is at most the query's (and inside the layer's sliding window). Blocks
shared by prefix caching are seen by every sequence whose table holds them. FlexAttention skips the (128 x 128)
tiles the mask leaves empty, so a query tile reads only the blocks of its own sequences.

On CUDA the call is compiled (torch.compile, shapes dynamic; the first step of a new kind pays for it); elsewhere
FlexAttention runs its unfused reference, which materialises the scores: the CPU tests use it to check the masks,
the engine's CPU steps never do (they have their own kernels). Unlike the gathering paths, a masked slot inside a
tile that is read is not zeroed first (its weight is 0, and 0 x NaN is NaN), so the engine writes keys and values
with non-finite values replaced (attention.py): no request's NaN can reach another's output.
"""

from dataclasses import dataclass, field

import torch

DEVICES = ("cuda",)  # where attention goes through FlexAttention (the CPU tests add "cpu")


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


@dataclass(slots=True)
class FlexDocs:
    """Packed documents without a cache (training, scoring): token q of document d sees token k of d when k is not
    after q, and the first prefixes[d] tokens of d's prefix source (attention.prefix_sources: a preference pair's or
    a GRPO group's shared prompt), with positions counted from the start of that prefix (sliding windows)."""

    doc: torch.Tensor  # [T] each token's document
    own: torch.Tensor  # [T] its index within its document
    prefix: torch.Tensor  # [D] tokens of the source document each document reads first (0: none)
    source: torch.Tensor  # [D] that source (-1: none)
    masks: dict = field(default_factory=dict)

    @classmethod
    def build(cls, lens: tuple[int, ...], prefixes: tuple[int, ...] | None, device: torch.device) -> "FlexDocs":
        from lmforge.layers.varlen import prefix_sources

        n = torch.tensor(lens, device=device)
        doc = torch.repeat_interleave(torch.arange(len(lens), device=device), n)
        own = torch.arange(int(n.sum()), device=device) - (torch.cumsum(n, 0) - n)[doc]
        prefixes = prefixes or (0,) * len(lens)
        sources = [s if p else -1 for p, s in zip(prefixes, prefix_sources(prefixes), strict=True)]
        return cls(doc, own, torch.tensor(prefixes, device=device), torch.tensor(sources, device=device))

    def block_mask(self, window: int | None):
        if window not in self.masks:
            from torch.nn.attention.flex_attention import create_block_mask

            doc, own, prefix, source = self.doc, self.own, self.prefix, self.source

            def visible(b, h, q, kv):
                d = doc[q]
                same = (doc[kv] == d) & (own[kv] <= own[q])
                ok = same | ((doc[kv] == source[d]) & (own[kv] < prefix[d]))
                if window is None:
                    return ok
                key_pos = torch.where(same, prefix[d] + own[kv], own[kv])
                return ok & (prefix[d] + own[q] - key_pos < window)

            self.masks[window] = create_block_mask(visible, None, None, len(doc), len(doc), device=doc.device)
        return self.masks[window]


_compiled = {}


def _flex():
    """flex_attention, compiled once per process on CUDA."""
    from torch.nn.attention.flex_attention import flex_attention

    if "fn" not in _compiled:
        _compiled["fn"] = torch.compile(flex_attention, dynamic=True) if torch.cuda.is_available() else flex_attention
    return _compiled["fn"]


def _call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, scale: float) -> torch.Tensor:
    """q [1, H, T, D], k / v [1, KVH, S, D]: FlexAttention, compiled on CUDA, its reference elsewhere."""
    from torch.nn.attention.flex_attention import flex_attention

    fn = _flex() if q.is_cuda else flex_attention
    return fn(q, k, v, block_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: FlexDocs, scale: float,
                     window: int | None) -> torch.Tensor:
    """q [T, H, D], k / v [T, KVH, D] of the packed documents -> [T, H, D]."""
    out = _call(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                docs.block_mask(window), scale)
    return out[0].transpose(0, 1)


def flex_paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, step: FlexStep,
                         scale: float, window: int | None) -> torch.Tensor:
    """q [T, H, D] (the step's new tokens, their keys and values already written) -> [T, H, D]."""
    kvh, dim = k_cache.shape[2], k_cache.shape[3]
    keys = k_cache.view(-1, kvh, dim).transpose(0, 1)[None]  # [1, KVH, slots, D], the pool in place
    values = v_cache.view(-1, kvh, dim).transpose(0, 1)[None]
    return _call(q.transpose(0, 1)[None], keys, values, step.block_mask(window), scale)[0].transpose(0, 1)
