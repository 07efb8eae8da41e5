"""Continuous batching under a token budget. No torch: unit-tested with hand-made sequences.

Each step hands out at most `max_num_batched_tokens` tokens: running sequences first (a decode needs 1,
an unfinished prefill takes what is left of the budget: chunked prefill), then waiting ones in policy order
(passing over those whose structured-output grammar is still compiling).
A decoding sequence with draft tokens (speculative decoding) takes 1 + its draft's length, the draft cut to fit.
Full blocks are published to the prefix cache as their step is handed out, so the n sequences of one request
and same-prefix requests admitted in one step share them. When blocks run out, the lowest-priority running
sequence is preempted: its blocks are freed and it waits to be recomputed (cheaply, when its blocks are still
in the prefix cache).
"""

import time
from dataclasses import dataclass, field

from lmforge.engine.block_manager import BlockManager
from lmforge.engine.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 policy: str = "fcfs"):
        if policy not in ("fcfs", "priority"):
            raise ValueError(f"scheduling policy must be 'fcfs' or 'priority', got {policy!r}")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.policy = policy
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []  # in admission order
        self.num_preemptions = 0

    def _key(self, seq: Sequence) -> tuple:
        """Smaller runs first: priority (under the priority policy), then arrival."""
        return (seq.priority if self.policy == "priority" else 0, seq.arrival_time, seq.seq_id)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch, budget = ScheduledBatch(), self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            spec = seq.spec_token_ids  # draft tokens, scored after the last token: cut to fit the budget
            n = min(seq.num_tokens + len(spec) - seq.num_computed_tokens, budget)
            del spec[max(0, n - 1):]
            if self.block_manager.allocate_slots(seq, n):
                # only verified tokens are hashed: draft tokens may yet be rejected
                self.block_manager.cache_full_blocks(seq, min(seq.num_computed_tokens + n, seq.num_tokens))
                batch.seqs.append(seq)
                batch.num_new_tokens.append(n)
                budget -= n
                i += 1
                continue
            if spec:  # no room for the draft: try the plain decode before preempting anyone
                spec.clear()
                continue
            victim = max(self.running[i:], key=self._key)  # never one already in this step's batch
            self._preempt(victim)
            batch.preempted.append(victim)
        if batch.preempted:  # memory is short: admit nobody new this step
            return batch
        self.waiting.sort(key=self._key)
        w = 0
        while w < len(self.waiting) and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[w]
            if seq.grammar is not None and not seq.grammar.ready:  # compiling off the step loop: others go first
                w += 1
                continue
            if not seq.block_table:
                self.block_manager.allocate_cached_prefix(seq)
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self.block_manager.allocate_slots(seq, n):
                self.block_manager.free(seq)  # do not sit on cached blocks while waiting
                seq.num_computed_tokens = 0
                break
            self.block_manager.cache_full_blocks(seq, seq.num_computed_tokens + n)  # n > 1 siblings share them now
            self.waiting.pop(w)
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = time.monotonic()
                seq.num_cached_tokens = seq.num_computed_tokens
            seq.set_status(SequenceStatus.RUNNING)
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            budget -= n
        return batch

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.spec_token_ids = []
        seq.num_preemptions += 1
        self.num_preemptions += 1
        seq.set_status(SequenceStatus.WAITING)
        self.waiting.append(seq)

    def advance(self, batch: ScheduledBatch) -> None:
        """After the model step: the scheduled tokens are computed."""
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            seq.num_computed_tokens += n

    def discard_rejected(self, seq: Sequence) -> None:
        """After verifying seq's draft (its accepted tokens appended): the rejected tokens' KV is not computed,
        and blocks that held only them are freed. Their slots are simply overwritten later."""
        seq.spec_token_ids = []
        if seq.is_finished:
            return
        seq.num_computed_tokens = min(seq.num_computed_tokens, seq.num_tokens - 1)
        self.block_manager.free_tail(seq, seq.num_tokens)

    def step_failed(self, batch: ScheduledBatch) -> None:
        """The model step raised: the blocks it was to fill must not be found by prefix caching."""
        for seq in batch.seqs:
            seq.spec_token_ids = []
            self.block_manager.uncache_uncomputed_blocks(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Retires a sequence (stopped, length-capped or aborted) wherever it is, freeing its blocks."""
        if seq.is_finished:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.finish_reason = reason
        seq.set_status(SequenceStatus.FINISHED)
