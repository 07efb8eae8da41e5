"""Grouped (right-padded) attention over packed documents equals one SDPA call per document, values and grads."""

import pytest
import torch

from lmforge.layers.attention import _sdpa
from lmforge.layers.varlen import grouped_attention, length_class


def test_length_classes():
    assert [length_class(n) for n in (1, 16, 17, 32, 33, 500, 512, 513)] == [16, 16, 32, 32, 64, 512, 512, 1024]


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
