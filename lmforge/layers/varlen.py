"""Attention over packed documents of different lengths without a cache (training, evaluation): documents of
similar length are right-padded into one batch per length class, so a micro-batch of 30 short chats costs a few
SDPA calls per layer instead of 30 (each call has a fixed cost that dwarfs a short document's work, forward and
backward). Right padding keeps plain causal attention exact for the real tokens: a token at position i only sees
keys 0..i, all real; the padded rows' outputs are dropped, so they receive no gradient."""

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

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
    layout = _layout(tuple(lens), tuple(prefixes) if prefixes else None, q.device)
    shapes = [(docs, (b - a) // docs) for a, b, docs in layout.batches]
    if layout.src is None:  # no padding and no prefix: the batches are views of q, k and v
        batches = zip(*(x.split([b - a for a, b, _ in layout.batches]) for x in (q, k, v)), strict=True)
        out = [sdpa(*(x.view(*shape, *x.shape[1:]) for x in qkv)).flatten(0, 1)
               for qkv, shape in zip(batches, shapes, strict=True)]
        return torch.cat(out) if len(out) > 1 else out[0]
    batches = zip(*(_Gather.apply(x, layout) for x in (q, k, v)), strict=True)
    return _Scatter.apply(layout, *(sdpa(*qkv) for qkv in batches))


@dataclass(frozen=True, slots=True)
class _Layout:
    """Where each document's rows sit in the padded batches, the same for every layer and pass of one batch."""

    batches: tuple[tuple[int, int, int], ...]  # (first slot, end slot, documents) of each padded batch
    src: torch.Tensor | None  # [slots] the row of q/k/v each slot holds; None: slot i holds row i, no padding
    own: torch.Tensor  # [T] the slot of each token's own output
    shared_src: torch.Tensor  # rows read again as another document's prefix ...
    shared_slots: torch.Tensor  # ... and the slots that hold them there
    slots: int


@lru_cache(maxsize=16)
def _layout(lens: tuple[int, ...], prefixes: tuple[int, ...] | None, device: torch.device) -> _Layout:
    """Padding slots repeat their document's last row (finite values: causal attention reads no later key, and
    their outputs are dropped); rows are listed once per slot, so each layer gathers q, k and v in one copy each."""
    starts = [0]
    for n in lens:
        starts.append(starts[-1] + n)
    prefixes = prefixes or (0,) * len(lens)
    owners = prefix_sources(prefixes)
    classes: dict[int, list[int]] = {}
    for i, n in enumerate(lens):
        classes.setdefault(length_class(prefixes[i] + n), []).append(i)
    batches, src, own, shared_src, shared_slots = [], [], [0] * starts[-1], [], []
    for length, docs in classes.items():
        if len(docs) == 1:  # alone in its class: no padding
            length = prefixes[docs[0]] + lens[docs[0]]
        first = len(src)
        for i in docs:
            p, s, n = prefixes[i], starts[i], lens[i]
            o = starts[owners[i]] if p else 0
            slot = len(src)
            src += [*range(o, o + p), *range(s, s + n)] + [max(s + n - 1, 0)] * (length - p - n)
            own[s:s + n] = range(slot + p, slot + p + n)
            shared_src += range(o, o + p)
            shared_slots += range(slot, slot + p)
        batches.append((first, len(src), len(docs)))
    identity = src == list(range(starts[-1]))

    def tensor(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    return _Layout(tuple(batches), None if identity else tensor(src), tensor(own), tensor(shared_src),
                   tensor(shared_slots), len(src))


class _Gather(torch.autograd.Function):
    """The padded batches of x [T, ...] (x[layout.src], split and shaped per batch). Backward: each row's gradient
    from its own slot plus those of the slots that read it as a prefix; padding slots give none. Only the indices
    are kept for backward, not x."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layout: _Layout) -> tuple[torch.Tensor, ...]:
        ctx.layout = layout
        rows = x.index_select(0, layout.src)
        return tuple(rows[a:b].view(docs, (b - a) // docs, *x.shape[1:]) for a, b, docs in layout.batches)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads: torch.Tensor):
        layout = ctx.layout
        grad = torch.cat([g.flatten(0, 1) for g in grads]) if len(grads) > 1 else grads[0].flatten(0, 1)
        out = grad.index_select(0, layout.own)
        if len(layout.shared_src):
            out.index_add_(0, layout.shared_src, grad.index_select(0, layout.shared_slots))
        return out, None


class _Scatter(torch.autograd.Function):
    """Each token's output [T, ...] read back from its own slot of the padded batches' outputs [docs, L, ...];
    backward: zero at the other slots."""

    @staticmethod
    def forward(ctx, layout: _Layout, *batches: torch.Tensor) -> torch.Tensor:
        ctx.layout, ctx.shapes = layout, [b.shape for b in batches]
        rows = torch.cat([b.flatten(0, 1) for b in batches]) if len(batches) > 1 else batches[0].flatten(0, 1)
        return rows.index_select(0, layout.own)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        layout = ctx.layout
        rows = grad.new_zeros(layout.slots, *grad.shape[1:]).index_copy_(0, layout.own, grad)
        parts = rows.split([shape[0] * shape[1] for shape in ctx.shapes])
        return None, *(part.view(shape) for part, shape in zip(parts, ctx.shapes, strict=True))
