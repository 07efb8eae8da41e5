"""Grouped (right-padded) attention over packed documents equals one SDPA call per document, values and grads."""

import pytest
import torch

from lmforge.layers.attention import _sdpa
from lmforge.layers.varlen import grouped_attention, length_class


def test_length_classes():
    assert [length_class(n) for n in (1, 16, 17, 32, 33, 64, 65, 81, 128, 129, 500, 512, 513)] == [
        16, 16, 32, 32, 64, 64, 80, 96, 128, 160, 512, 512, 640]


@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("lens", [(5, 17, 9, 30, 3, 12, 21, 8, 64, 65, 1), (40, 41, 33), (7,) * 5])
def test_grouped_equals_per_document(lens, window):
    t = sum(lens)
    q, k, v = (torch.randn(t, h, 8, dtype=torch.float64, requires_grad=True) for h in (6, 2, 2))

    def attend(a, b, c):
        return _sdpa(a, b, c, 0.3, window)

    ref = torch.cat([attend(a[None], b[None], c[None])[0] for a, b, c in zip(q.split(lens), k.split(lens),
                                                                             v.split(lens), strict=True)])
    out = grouped_attention(q, k, v, lens, attend)
    grad = torch.randn_like(ref)
    torch.testing.assert_close(out, ref)
    for got, want in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad),
                         strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("lens,prefixes", [((12, 5, 9, 20, 30, 3), (0, 11, 0, 8, 0, 29)),  # shared prompts
                                           ((40, 2, 17), (0, 0, 16)), ((9, 9), (0, 9))])
def test_a_document_attends_to_its_prefix_in_the_previous_one(lens, prefixes, window):
    """Document i with prefixes[i] = p sees the first p tokens of document i - 1, then its own: as if those tokens
    were written in front of it (a preference pair's rejected answer after the chosen document's prompt)."""
    t = sum(lens)
    q, k, v = (torch.randn(t, h, 8, dtype=torch.float64, requires_grad=True) for h in (6, 2, 2))

    def attend(a, b, c):
        return _sdpa(a, b, c, 0.3, window)

    starts = [0, *torch.tensor(lens).cumsum(0).tolist()]
    ref = []
    for i, (n, p) in enumerate(zip(lens, prefixes, strict=True)):
        own = slice(starts[i], starts[i] + n)
        before = slice(starts[i - 1], starts[i - 1] + p) if p else slice(0, 0)
        a, b, c = (torch.cat([x[before], x[own]])[None] for x in (q, k, v))
        ref.append(attend(a, b, c)[0, p:])
    ref = torch.cat(ref)
    out = grouped_attention(q, k, v, lens, attend, prefixes)
    grad = torch.randn_like(ref)
    torch.testing.assert_close(out, ref)
    for got, want in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad),
                         strict=True):
        torch.testing.assert_close(got, want)
