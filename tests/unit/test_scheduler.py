"""Scheduler: token budget, chunked prefill, admission limits, preemption, priority, abort. No model."""

import pytest

from lmforge.engine.block_manager import BlockManager
from lmforge.engine.sampling_params import SamplingParams
from lmforge.engine.scheduler import Scheduler
from lmforge.engine.sequence import Sequence, SequenceStatus


def make(n_tokens: int, rid: str = "r", priority: int = 0, arrival: float = 0.0, first: int = 100) -> Sequence:
    """A prompt of tokens first, first + 1, ...: sequences made with the same `first` share a prefix."""
    return Sequence(rid, list(range(first, first + n_tokens)), SamplingParams(), priority=priority,
                    arrival_time=arrival)


def step(sched: Scheduler, next_token: int = 7):
    """One engine step without a model: advance, then append a token to each sequence that finished its prompt."""
    batch = sched.schedule()
    sched.advance(batch)
    for s in batch.seqs:
        if s.num_computed_tokens == s.num_tokens:
            s.token_ids.append(next_token)
    return batch


def assert_no_leak(sched: Scheduler) -> None:
    for s in list(sched.running) + list(sched.waiting):
        sched.finish(s, "abort")
    bm = sched.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_prefill_then_decode_one_token_each():
    sched = Scheduler(BlockManager(32, 4), max_num_seqs=8, max_num_batched_tokens=64)
    a, b = make(10, "a"), make(5, "b", first=500)
    sched.add(a)
    sched.add(b)
    batch = step(sched)
    assert batch.num_new_tokens == [10, 5]
    batch = step(sched)
    assert batch.num_new_tokens == [1, 1] and batch.seqs == [a, b]
    assert_no_leak(sched)


def test_chunked_prefill_splits_long_prompts_and_mixes_with_decodes():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=8)
    short, long = make(3, "s"), make(20, "l")
    sched.add(short)
    sched.add(long)
    assert step(sched).num_new_tokens == [3, 5]  # the long prompt takes what is left of the budget
    assert step(sched).num_new_tokens == [1, 7]  # the decode first, then the next chunk
    assert step(sched).num_new_tokens == [1, 7]
    batch = step(sched)
    assert batch.num_new_tokens == [1, 1] and long.num_output_tokens == 1
    assert_no_leak(sched)


def test_max_num_seqs_limits_admission():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=2, max_num_batched_tokens=100)
    seqs = [make(3, str(i), arrival=i) for i in range(3)]
    for s in seqs:
        sched.add(s)
    assert step(sched).seqs == seqs[:2]
    sched.finish(seqs[0], "stop")
    assert step(sched).seqs == [seqs[1], seqs[2]]
    assert_no_leak(sched)


def test_preemption_when_blocks_run_out_then_recompute():
    sched = Scheduler(BlockManager(6, 4), max_num_seqs=8, max_num_batched_tokens=100)
    a, b = make(8, "a", arrival=0), make(8, "b", arrival=1)
    sched.add(a)
    sched.add(b)
    step(sched)  # 2 blocks each; 2 free
    for _ in range(8):
        step(sched)
    # growing both past 12 tokens needs 2 more blocks each: b (admitted last) is preempted for a
    assert b.num_preemptions >= 1 and sched.num_preemptions >= 1
    assert a.status is SequenceStatus.RUNNING
    while b.status is not SequenceStatus.RUNNING:
        sched.finish(a, "stop")
        step(sched)
    assert b.num_computed_tokens == b.num_tokens - 1 or b.num_computed_tokens == b.num_tokens
    assert_no_leak(sched)


def test_priority_policy_admits_and_keeps_lower_values_first():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=1, max_num_batched_tokens=100, policy="priority")
    low, high = make(3, "low", priority=5, arrival=0), make(3, "high", priority=0, arrival=1)
    sched.add(low)
    sched.add(high)
    assert step(sched).seqs == [high]
    assert_no_leak(sched)


def test_priority_preemption_picks_the_least_important():
    sched = Scheduler(BlockManager(4, 4), max_num_seqs=8, max_num_batched_tokens=100, policy="priority")
    vip, bulk = make(4, "vip", priority=0, arrival=1), make(4, "bulk", priority=9, arrival=0)
    sched.add(bulk)
    sched.add(vip)
    step(sched)
    for _ in range(8):
        step(sched)
    assert vip.num_preemptions == 0 and bulk.num_preemptions >= 1
    assert_no_leak(sched)


def test_abort_waiting_and_running_frees_blocks():
    sched = Scheduler(BlockManager(16, 4), max_num_seqs=1, max_num_batched_tokens=100)
    running, waiting = make(6, "run"), make(6, "wait", arrival=1)
    sched.add(running)
    sched.add(waiting)
    step(sched)
    sched.finish(waiting, "abort")
    sched.finish(running, "abort")
    assert running.finish_reason == waiting.finish_reason == "abort"
    assert not sched.has_unfinished() and sched.block_manager.num_free_blocks == 16


def test_prefix_hit_counts_as_computed_and_is_recorded():
    sched = Scheduler(BlockManager(32, 4), max_num_seqs=8, max_num_batched_tokens=100)
    a = make(10, "a")
    sched.add(a)
    step(sched)
    b = make(10, "b")
    sched.add(b)
    batch = step(sched)
    assert batch.num_new_tokens == [1, 2] and b.num_cached_tokens == 8
    assert_no_leak(sched)


def test_same_prefix_admitted_in_one_step_shares_blocks():
    """The n sequences of one request (or any same-prefix requests) arriving together: the first's full blocks
    are published as its step is handed out, so the others start with them computed, in that very step."""
    sched = Scheduler(BlockManager(32, 4), max_num_seqs=8, max_num_batched_tokens=100)
    a, b, c = make(10, "a"), make(10, "a"), make(10, "a")
    for s in (a, b, c):
        sched.add(s)
    batch = step(sched)
    assert batch.num_new_tokens == [10, 2, 2] and b.num_cached_tokens == c.num_cached_tokens == 8
    assert a.block_table[:2] == b.block_table[:2] == c.block_table[:2] and a.block_table[2] != b.block_table[2]
    assert_no_leak(sched)


def test_a_failed_step_leaves_no_cached_blocks_behind():
    bm = BlockManager(32, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    a = make(10, "a")
    sched.add(a)
    batch = sched.schedule()  # hands out a's 10 tokens: its 2 full blocks are published ...
    sched.step_failed(batch)  # ... and withdrawn when the model step raises
    assert not bm.cached
    sched.finish(a, "abort")  # what AsyncEngine does to the requests of a failed step
    b = make(10, "b")
    sched.add(b)
    assert step(sched).num_new_tokens == [10] and b.num_cached_tokens == 0  # nothing stale to hit
    assert_no_leak(sched)


def test_unknown_policy_is_rejected():
    with pytest.raises(ValueError, match="policy"):
        Scheduler(BlockManager(4, 4), 1, 1, policy="lifo")
