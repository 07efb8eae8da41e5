"""The flat layout and the paged KV path give the logits of a plain per-sequence forward."""

import contextlib

import pytest
import torch

from lmforge import kernels
from lmforge.layers.attention import AttnMeta
from tests.tiny import TINY_LLAMA, tiny_model


def forward_alone(model, ids):
    n = len(ids)
    return model.logits(model(ids, torch.arange(n), AttnMeta.for_sequences([n])))


@torch.no_grad()
def test_packed_documents_never_see_each_other():
    model = tiny_model()
    a, b = torch.randint(0, 96, (9,)), torch.randint(0, 96, (5,))
    cu = torch.tensor([0, 9, 14])
    packed = model.logits(model(torch.cat([a, b]), torch.cat([torch.arange(9), torch.arange(5)]),
                                AttnMeta.for_training(cu)))
    torch.testing.assert_close(packed[:9], forward_alone(model, a), atol=1e-5, rtol=0)
    torch.testing.assert_close(packed[9:], forward_alone(model, b), atol=1e-5, rtol=0)


def paged_step(model, kv, table, ids, start):
    """Runs tokens ids at positions start.. of one sequence whose blocks are table (block size 16)."""
    positions = torch.arange(start, start + len(ids))
    slots = table[positions // 16] * 16 + positions % 16
    meta = AttnMeta.for_paged([len(ids)], [start + len(ids)], slots, table[None])
    return model.logits(model(ids, positions, meta, kv))


@torch.no_grad()
def test_paged_prefill_chunks_and_decode_match_full_forward():
    model = tiny_model()
    ids = torch.randint(0, 96, (40,))
    full = forward_alone(model, ids)
    shape = (4, 16, TINY_LLAMA["num_key_value_heads"], 8)
    kv = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(2)]
    table = torch.tensor([2, 0, 3])
    # a prefill of 17 tokens (crosses a block boundary), a chunk of 6, then single-token decodes
    rows = [paged_step(model, kv, table, ids[:17], 0)[-1], paged_step(model, kv, table, ids[17:23], 17)[-1]]
    rows += [paged_step(model, kv, table, ids[pos:pos + 1], pos)[-1] for pos in range(23, 40)]
    expected = full[[16, 22, *range(23, 40)]]
    torch.testing.assert_close(torch.stack(rows), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("path", ["one-by-one", "batched-decode", "kernel"])
@torch.no_grad()
def test_two_sequences_share_one_paged_step(path):
    """Different context lengths in one call, each reading its own blocks (one by one, batched decode, CPU kernel)
    and nothing else: the cache starts NaN, as blocks freed by a request whose values overflowed would be, and no
    slot a sequence has not written (a block's unused tail, padding) reaches its output."""
    if path == "kernel" and kernels.cpu_ops() is None:
        pytest.skip("CPU kernels unavailable")
    with contextlib.nullcontext() if path == "kernel" else kernels.disabled():
        _two_sequences(path)


def _two_sequences(path):
    model = tiny_model()
    a, b = torch.randint(0, 96, (20,)), torch.randint(0, 96, (7,))
    shape = (8, 16, TINY_LLAMA["num_key_value_heads"], 8)
    kv = [(torch.full(shape, float("nan")), torch.full(shape, float("nan"))) for _ in range(2)]
    tables = torch.tensor([[3, 1], [5, 0]])  # deliberately out of order

    def slots(table, positions):
        return table[positions // 16] * 16 + positions % 16

    pos_a, pos_b = torch.arange(19), torch.arange(6)
    meta = AttnMeta.for_paged([19, 6], [19, 6], torch.cat([slots(tables[0], pos_a), slots(tables[1], pos_b)]), tables)
    model(torch.cat([a[:19], b[:6]]), torch.cat([pos_a, pos_b]), meta, kv)
    last = torch.tensor([19, 6])
    meta = AttnMeta.for_paged([1, 1], [20, 7], torch.stack([slots(tables[0], last[:1]), slots(tables[1], last[1:])])
                              .flatten(), tables, block_size=16 if path == "batched-decode" else None)
    assert (meta.decode is not None) == (path == "batched-decode")
    assert (meta.kernel is not None) == (path == "kernel")
    out = model.logits(model(torch.stack([a[19], b[6]]), last, meta, kv))
    torch.testing.assert_close(out[0], forward_alone(model, a)[-1], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1], forward_alone(model, b)[-1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("path", ["torch", "kernel"])
@pytest.mark.parametrize("queries", [4, 6])
@torch.no_grad()
def test_several_queries_of_a_decode_over_its_paged_context(path, queries):
    """Speculative decoding scores 1 + k tokens of a decoding sequence at once: each query sees its cached
    context and the new tokens before it, next to a plain single-token decode (kernel: 4 queries take the short-
    query rule, 6 the work rule)."""
    if path == "kernel" and kernels.cpu_ops() is None:
        pytest.skip("CPU kernels unavailable")
    model = tiny_model()
    a, b = torch.randint(0, 96, (30,)), torch.randint(0, 96, (9,))
    shape = (8, 16, TINY_LLAMA["num_key_value_heads"], 8)
    kv = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(2)]
    tables = torch.tensor([[6, 2], [1, 4]])

    def slots(table, positions):
        return table[positions // 16] * 16 + positions % 16

    done_a = 30 - queries
    with contextlib.nullcontext() if path == "kernel" else kernels.disabled():
        pos_a, pos_b = torch.arange(done_a), torch.arange(8)
        meta = AttnMeta.for_paged([done_a, 8], [done_a, 8], torch.cat([slots(tables[0], pos_a),
                                                                      slots(tables[1], pos_b)]), tables)
        model(torch.cat([a[:done_a], b[:8]]), torch.cat([pos_a, pos_b]), meta, kv)
        new_a, new_b = torch.arange(done_a, 30), torch.tensor([8])
        meta = AttnMeta.for_paged([queries, 1], [30, 9], torch.cat([slots(tables[0], new_a), slots(tables[1], new_b)]),
                                  tables, block_size=16)
        assert (meta.kernel is not None) == (path == "kernel")
        out = model.logits(model(torch.cat([a[done_a:], b[8:]]), torch.cat([new_a, new_b]), meta, kv))
    torch.testing.assert_close(out[:queries], forward_alone(model, a)[done_a:], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[queries], forward_alone(model, b)[-1], atol=1e-5, rtol=0)
