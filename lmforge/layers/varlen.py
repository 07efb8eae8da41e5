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
                      sdpa: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                      prefixes: tuple[int, ...] | None = None) -> torch.Tensor:
    """q [T, H, D], k/v [T, KVH, D] of documents `lens` laid end to end -> [T, H, D]; sdpa(q, k, v) attends a
    batch [B, L, heads, D] causally. Document i first attends to the first prefixes[i] tokens of document i - 1
    (a shared prompt): they are gathered in front of its own tokens, and their outputs there are dropped, so
    their queries get no gradient from it while their keys and values get it from both documents."""
    starts = [0]
    for n in lens:
        starts.append(starts[-1] + n)
    prefixes = prefixes or (0,) * len(lens)
    classes: dict[int, list[int]] = {}
    for i, n in enumerate(lens):
        classes.setdefault(length_class(prefixes[i] + n), []).append(i)
    out = None  # allocated at the first result: under autocast attention computes in the autocast dtype
    for length, docs in classes.items():
        if len(docs) == 1 and not prefixes[docs[0]]:  # alone in its class: no padding needed
            s, n = starts[docs[0]], lens[docs[0]]
            tokens = torch.arange(s, s + n, device=q.device)
            attended = sdpa(q[None, s:s + n], k[None, s:s + n], v[None, s:s + n])[0]
        else:
            if len(docs) == 1:  # no padding either
                length = prefixes[docs[0]] + lens[docs[0]]
            sources, tokens, slots, owned = [], [], [], []
            for j, i in enumerate(docs):
                p, s, n = prefixes[i], starts[i], lens[i]
                sources += [torch.arange(starts[i - 1], starts[i - 1] + p), torch.arange(s, s + n)]
                tokens.append(torch.arange(s, s + n))
                slots.append(torch.arange(j * length, j * length + p + n))
                owned.append(torch.arange(j * length + p, j * length + p + n))
            sources, tokens, slots, owned = (torch.cat(x).to(q.device) for x in (sources, tokens, slots, owned))
            batch = [_padded(x, sources, slots, len(docs), length) for x in (q, k, v)]
            attended = sdpa(*batch).reshape(len(docs) * length, *q.shape[1:]).index_select(0, owned)
        if out is None:
            out = torch.empty(q.shape, dtype=attended.dtype, device=q.device)
        out.index_copy_(0, tokens, attended)
    return out


def _padded(x: torch.Tensor, tokens: torch.Tensor, slots: torch.Tensor, count: int, length: int) -> torch.Tensor:
    padded = x.new_zeros(count * length, *x.shape[1:]).index_copy(0, slots, x.index_select(0, tokens))
    return padded.view(count, length, *x.shape[1:])
