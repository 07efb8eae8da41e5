"""Block manager: allocation, sharing by prefix hash, LRU eviction, no leaks. Hand-made sequences, no model."""

import pytest

from lmforge.engine.block_manager import BlockManager
from lmforge.engine.sampling_params import SamplingParams
from lmforge.engine.sequence import Sequence, SequenceStatus


def seq(tokens, adapter_id=0) -> Sequence:
    return Sequence("r", list(tokens), SamplingParams(), adapter_id=adapter_id)


def compute(bm: BlockManager, s: Sequence) -> None:
    """What a scheduled step does to a sequence: blocks for all its tokens, then mark them computed."""
    assert bm.allocate_slots(s, s.num_tokens - s.num_computed_tokens)
    s.num_computed_tokens = s.num_tokens
    bm.cache_full_blocks(s, s.num_tokens)


def test_allocation_grows_by_blocks_and_frees_everything():
    bm = BlockManager(num_blocks=8, block_size=4)
    s = seq(range(10))
    assert bm.allocate_slots(s, 10) and len(s.block_table) == 3 and bm.num_free_blocks == 5
    s.num_computed_tokens = 10
    assert bm.allocate_slots(s, 2) and len(s.block_table) == 3  # fits in the third block
    assert bm.allocate_slots(s, 3) and len(s.block_table) == 4
    bm.free(s)
    assert bm.num_free_blocks == 8 and s.block_table == []


def test_refuses_without_partial_allocation():
    bm = BlockManager(num_blocks=2, block_size=4)
    s = seq(range(12))
    assert not bm.allocate_slots(s, 12)
    assert s.block_table == [] and bm.num_free_blocks == 2


def test_shared_prefix_reuses_physical_blocks():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = seq([1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    compute(bm, a)
    b = seq([1, 2, 3, 4, 5, 6, 7, 8, 99, 98, 97])
    assert bm.allocate_cached_prefix(b) == 8
    assert b.block_table == a.block_table[:2] and b.num_computed_tokens == 8
    assert all(bm.blocks[i].ref_count == 2 for i in b.block_table)
    assert bm.hit_rate == pytest.approx(8 / 11)
    compute(bm, b)
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 16


def test_fully_cached_prompt_still_computes_its_last_token():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = seq(range(8))
    compute(bm, a)
    b = seq(range(8))
    assert bm.allocate_cached_prefix(b) == 4  # the second block is recomputed so the model yields logits
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 8


def test_adapter_id_separates_cache_entries():
    bm = BlockManager(num_blocks=8, block_size=4)
    compute(bm, seq(range(9)))
    assert bm.allocate_cached_prefix(seq(range(9), adapter_id=1)) == 0


def test_freed_blocks_stay_cached_until_evicted_least_recent_first():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = seq([1, 2, 3, 4, 5])
    compute(bm, a)  # 3 blocks, two full and hashed
    bm.free(a)
    assert bm.num_free_blocks == 4 and len(bm.cached) == 2
    b = seq([1, 2, 3, 4, 7])
    assert bm.allocate_cached_prefix(b) == 4  # found after being freed
    bm.free(b)
    c = seq([9, 9, 9, 9, 9, 9, 9, 9])
    assert bm.allocate_slots(c, 8)  # needs all four blocks: evicts both cached ones
    assert bm.cached == {}
    bm.free(c)
    assert bm.allocate_cached_prefix(seq([1, 2, 3, 4, 5])) == 0


def test_unhashed_blocks_are_reused_before_cached_ones():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = seq([1, 2, 3])  # one full (cached) block and one partial
    compute(bm, a)
    bm.free(a)
    b = seq([5])
    assert bm.allocate_slots(b, 1)
    assert bm.blocks[b.block_table[0]].hash is None and len(bm.cached) == 1


def test_reset_prefix_cache_refused_while_blocks_in_use():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = seq([1, 2, 3])
    compute(bm, a)
    assert not bm.reset_prefix_cache()
    bm.free(a)
    assert bm.reset_prefix_cache() and bm.cached == {}
    assert bm.allocate_cached_prefix(seq([1, 2, 3])) == 0


def test_prefix_caching_disabled_never_shares():
    bm = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=False)
    compute(bm, seq([1, 2, 3, 4, 5]))
    assert bm.allocate_cached_prefix(seq([1, 2, 3, 4, 5])) == 0 and bm.cached == {}


def test_sequence_lifecycle_rejects_invalid_transitions():
    s = seq([1])
    s.set_status(SequenceStatus.RUNNING)
    s.set_status(SequenceStatus.WAITING)
    s.set_status(SequenceStatus.FINISHED)
    with pytest.raises(RuntimeError, match="invalid transition finished -> running"):
        s.set_status(SequenceStatus.RUNNING)
