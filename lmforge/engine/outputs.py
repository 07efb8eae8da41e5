"""What the engine returns, shaped like vLLM's offline API so users can switch without rewriting."""

from dataclasses import dataclass, field


@dataclass(slots=True)
class Logprob:
    logprob: float
    rank: int | None = None  # 1-based rank under the model's distribution (None when not computed)
    decoded_token: str | None = None


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, Logprob]] | None = None  # per generated token: sampled token + the top-k
    finish_reason: str | None = None  # "stop", "length" or "abort"; None while running
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it

    def finished(self) -> bool:  # vLLM's CompletionOutput.finished()
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    num_preemptions: int = 0


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    num_cached_tokens: int = 0
    new_text: list[str] = field(default_factory=list)  # per output: text added since the previous RequestOutput
    lora_request: object | None = None  # the LoRARequest it was generated with (None: the base model)
    # with SamplingParams.prompt_logprobs, once the prefill has scored them: None for the first prompt token, then per
    # token {id: Logprob} of the actual token (first) and the top k, as vLLM's
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None


@dataclass(frozen=True, slots=True)
class EngineStats:
    """The engine's state between two steps (LLMEngine.stats()): what /metrics exports."""

    running: int  # sequences in the running batch
    waiting: int  # sequences waiting for a slot (new or preempted)
    kv_usage: float  # fraction of KV blocks in use
    kv_blocks: int
    prefix_queries: int  # prompt tokens looked up in the prefix cache, since start
    prefix_hits: int  # of which found there
    preemptions: int
    steps: int  # model steps run
    spec: object | None = None  # SpecDecodeStats (a copy); None when speculation is off
