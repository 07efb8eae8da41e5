"""A request's state inside the engine: tokens, progress, KV blocks, lifecycle. No torch here."""

import enum
import itertools
import time
from dataclasses import dataclass, field

from lmforge.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


# waiting -> running (scheduled), running -> waiting (preempted), either -> finished (done or aborted)
ALLOWED = {
    SequenceStatus.WAITING: {SequenceStatus.RUNNING, SequenceStatus.FINISHED},
    SequenceStatus.RUNNING: {SequenceStatus.WAITING, SequenceStatus.FINISHED},
    SequenceStatus.FINISHED: set(),
}

_ids = itertools.count()


@dataclass(slots=True)
class Sequence:
    """One completion being generated. The scheduler advances `num_computed_tokens` towards `num_tokens`:
    prefill, chunked prefill, recomputation after preemption and decode are all that one mechanism."""

    request_id: str
    token_ids: list[int]
    params: SamplingParams
    num_prompt_tokens: int = -1
    index: int = 0  # which of the request's n completions
    priority: int = 0  # lower runs first under the priority policy
    adapter_id: int = 0  # hashed into prefix-cache keys: blocks never shared across adapters
    seq_id: int = field(default_factory=lambda: next(_ids))
    arrival_time: float = field(default_factory=time.monotonic)
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache at the first schedule
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # chained hashes of this sequence's full blocks
    spec_token_ids: list[int] = field(default_factory=list)  # this step's draft tokens (speculative decoding)
    grammar: object | None = None  # structured output: a SequenceGrammar (engine/structured.py); no torch here
    needs_prompt_logprobs: bool = False  # its prefill must score every prompt token (engine/prompt_logprobs.py)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None

    def __post_init__(self):
        if self.num_prompt_tokens < 0:
            self.num_prompt_tokens = len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def set_status(self, new: SequenceStatus) -> None:
        if new not in ALLOWED[self.status]:
            raise RuntimeError(f"sequence {self.request_id}/{self.index}: invalid transition "
                               f"{self.status.value} -> {new.value}")
        self.status = new
