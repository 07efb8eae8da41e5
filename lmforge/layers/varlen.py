"""Attention over packed documents of different lengths without a cache (training, evaluation): documents of
similar length are right-padded into one batch per length class, so a micro-batch of 30 short chats costs a few
SDPA calls per layer instead of 30 (each call has a fixed cost that dwarfs a short document's work, forward and
backward). Right padding keeps plain causal attention exact for the real tokens: a token at position i only sees
keys 0..i, all real; the padded rows' outputs are dropped, so they receive no gradient."""

from collections.abc import Callable

import torch

MIN_CLASS = 16  # shortest padded length: below it, per-token overheads dominate anyway


def length_class(n: int) -> int:
    """The padded length of a document: the next power of two (at most 2x the tokens, 4x the attention work)."""
    return max(MIN_CLASS, 1 << (n - 1).bit_length())


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: tuple[int, ...],
                      sdpa: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """q [T, H, D], k/v [T, KVH, D] of documents `lens` laid end to end -> [T, H, D]; sdpa(q, k, v) attends a
    batch [B, L, heads, D] causally."""
    starts = [0]
    for n in lens:
        starts.append(starts[-1] + n)
    classes: dict[int, list[int]] = {}
    for i, n in enumerate(lens):
        classes.setdefault(length_class(n), []).append(i)
    out = None  # allocated at the first result: under autocast attention computes in the autocast dtype
    for length, docs in classes.items():
        if len(docs) == 1:  # alone in its class: no padding needed
            s, n = starts[docs[0]], lens[docs[0]]
            tokens = torch.arange(s, s + n, device=q.device)
            attended = sdpa(q[None, s:s + n], k[None, s:s + n], v[None, s:s + n])[0]
        else:
            tokens = torch.cat([torch.arange(starts[i], starts[i] + lens[i]) for i in docs]).to(q.device)
            slots = torch.cat([torch.arange(j * length, j * length + lens[i]) for j, i in enumerate(docs)])
            slots = slots.to(q.device)
            batch = [_padded(x, tokens, slots, len(docs), length) for x in (q, k, v)]
            attended = sdpa(*batch).reshape(len(docs) * length, *q.shape[1:]).index_select(0, slots)
        if out is None:
            out = torch.empty(q.shape, dtype=attended.dtype, device=q.device)
        out.index_copy_(0, tokens, attended)
    return out


def _padded(x: torch.Tensor, tokens: torch.Tensor, slots: torch.Tensor, count: int, length: int) -> torch.Tensor:
    padded = x.new_zeros(count * length, *x.shape[1:]).index_copy(0, slots, x.index_select(0, tokens))
    return padded.view(count, length, *x.shape[1:])
