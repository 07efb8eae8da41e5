"""Attention over packed documents of different lengths without a cache (training, evaluation): documents of
similar length are right-padded into one batch per length class, so a micro-batch of 30 short chats costs a few
SDPA calls per layer instead of 30 (each call has a fixed cost that dwarfs a short document's work, forward and
backward). Right padding keeps plain causal attention exact for the real tokens: a token at position i only sees
keys 0..i, all real; the padded rows' outputs are dropped, so they receive no gradient."""

from collections.abc import Callable

import torch

MIN_CLASS = 16  # shortest padded length: below it, per-token overheads dominate anyway


def length_class(n: int) -> int:
    """The padded length of a document: the next power of two up to 64 tokens, above it the next multiple of a
    quarter of the power of two below (80, 96, 112, 128, 160, ...): at most 1.25x the tokens, where whole powers
    of two padded a preference pair's 65-token documents to 128 and did 3.9x their attention work."""
    if n <= 64:
        return max(MIN_CLASS, 1 << (n - 1).bit_length())
    step = 1 << ((n - 1).bit_length() - 3)
    return -(-n // step) * step


def prefix_sources(prefixes: tuple[int, ...]) -> list[int | None]:
    """Per document, the document whose first tokens its prefix is: the last one before it with prefix 0."""
    sources, last = [], None
    for i, p in enumerate(prefixes):
        sources.append(last)
        if not p:
            last = i
    return sources


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: tuple[int, ...],
                      sdpa: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                      prefixes: tuple[int, ...] | None = None) -> torch.Tensor:
    """q [T, H, D], k/v [T, KVH, D] of documents `lens` laid end to end -> [T, H, D]; sdpa(q, k, v) attends a
    batch [B, L, heads, D] causally. Document i first attends to the first prefixes[i] tokens of the last document
    before it with prefix 0 (a shared prompt: attention.prefix_sources): they are gathered in front of its own
    tokens, and their outputs there are dropped, so their queries get no gradient from it while their keys and
    values get it from every document that reads them."""
    starts = [0]
    for n in lens:
        starts.append(starts[-1] + n)
    prefixes = prefixes or (0,) * len(lens)
    owners = prefix_sources(prefixes)
    classes: dict[int, list[int]] = {}
    for i, n in enumerate(lens):
        classes.setdefault(length_class(prefixes[i] + n), []).append(i)
    blocks, owned, tokens = [], [], []  # each class's attended rows, which of them are real tokens, and whose
    done = 0
    for length, docs in classes.items():
        if len(docs) == 1 and not prefixes[docs[0]]:  # alone in its class: no padding needed
            s, n = starts[docs[0]], lens[docs[0]]
            blocks.append(sdpa(q[None, s:s + n], k[None, s:s + n], v[None, s:s + n])[0])
            owned.append(torch.arange(done, done + n))
            tokens.append(torch.arange(s, s + n))
        else:
            if len(docs) == 1:  # no padding either
                length = prefixes[docs[0]] + lens[docs[0]]
            sources, slots = [], []
            for j, i in enumerate(docs):
                p, s, n = prefixes[i], starts[i], lens[i]
                o = starts[owners[i]] if p else 0
                sources += [torch.arange(o, o + p), torch.arange(s, s + n)]
                slots.append(torch.arange(j * length, j * length + p + n))
                owned.append(torch.arange(done + j * length + p, done + j * length + p + n))
                tokens.append(torch.arange(s, s + n))
            sources, slots = torch.cat(sources).to(q.device), torch.cat(slots).to(q.device)
            batch = [_Rows.apply(x, sources, slots, len(docs) * length).view(len(docs), length, *x.shape[1:])
                     for x in (q, k, v)]
            blocks.append(sdpa(*batch).flatten(0, 1))
        done += len(blocks[-1])
    owned, tokens = torch.cat(owned).to(q.device), torch.cat(tokens).to(q.device)
    return _Rows.apply(torch.cat(blocks) if len(blocks) > 1 else blocks[0], owned, tokens, len(q))


class _Rows(torch.autograd.Function):
    """out[dst] = x[src] in a zero tensor of `rows` rows. Unlike index_select + index_copy, which keep their
    copies of x for backward, it keeps only the indices: attention's padded batches are built and read back with
    it, and the tensors attention itself saves are the only ones left."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, rows: int) -> torch.Tensor:
        out = x.new_zeros(rows, *x.shape[1:])
        out[dst] = x[src]
        ctx.save_for_backward(src, dst)
        ctx.rows_in = len(x)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        src, dst = ctx.saved_tensors
        return grad.new_zeros(ctx.rows_in, *grad.shape[1:]).index_add_(0, src, grad[dst]), None, None, None
