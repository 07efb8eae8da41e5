"""Per-request generation settings, with vLLM's names and defaults; invalid values fail before queueing."""

import math
from dataclasses import dataclass, field

MAX_LOGPROBS = 20  # top alternatives per token, sampled or prompt (vLLM's default max_logprobs)
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for logit_bias values: [-100, 100]


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop. temperature 0 is greedy (the OpenAI contract)."""

    n: int = 1  # completions per prompt; they share the prompt's KV blocks through prefix caching
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1): no top-k cut
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or output (HF/vLLM semantics)
    presence_penalty: float = 0.0  # OpenAI: subtracted once from tokens already in the output
    frequency_penalty: float = 0.0  # OpenAI: subtracted per occurrence in the output
    seed: int | None = None  # same seed, same output, whatever else is in the batch
    max_tokens: int = 16
    min_tokens: int = 0  # EOS and stop_token_ids are masked until this many tokens are generated
    stop: tuple[str, ...] = ()  # stop strings, never part of the returned text
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: no logprobs; k >= 0: the sampled token's plus the top k
    prompt_logprobs: int | None = None  # None: none; k >= 0: each prompt token's (the first's is None) plus the top k
    logit_bias: dict[int, float] | None = field(default=None, hash=False)  # token id -> added to its logit
    allowed_token_ids: tuple[int, ...] | None = None  # only these tokens may be sampled
    bad_words: tuple[str, ...] = ()  # words never generated: the last token of each is banned after the rest
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    extra: dict = field(default_factory=dict, compare=False, repr=False)  # room for server-side metadata
    # set by the engine from bad_words and its tokenizer (vLLM's _bad_words_token_ids); not for users to fill
    bad_words_token_ids: tuple[tuple[int, ...], ...] = field(default=(), compare=False, repr=False)

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        if isinstance(self.bad_words, str):
            object.__setattr__(self, "bad_words", (self.bad_words,))
        object.__setattr__(self, "bad_words", tuple(self.bad_words or ()))
        if self.allowed_token_ids is not None:
            object.__setattr__(self, "allowed_token_ids", tuple(self.allowed_token_ids))
        if self.logit_bias is not None:
            object.__setattr__(self, "logit_bias", dict(self.logit_bias))
        checks = [
            ("n", self.n >= 1, "must be >= 1"),
            ("temperature", self.temperature >= 0, "must be >= 0"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("top_k", self.top_k >= 0, "must be >= 0 (0 or -1 disables it)"),
            ("min_p", 0 <= self.min_p <= 1, "must be in [0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0, "must be > 0"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "must be in [-2, 2]"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "must be in [-2, 2]"),
            ("max_tokens", self.max_tokens >= 1, "must be >= 1"),
            ("min_tokens", 0 <= self.min_tokens <= self.max_tokens, "must be in [0, max_tokens]"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
             f"must be in [0, {MAX_LOGPROBS}]"),
            ("prompt_logprobs", self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_LOGPROBS,
             f"must be in [0, {MAX_LOGPROBS}]"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "must hold non-empty strings"),
            ("logit_bias", self.logit_bias is None or all(_token_id(t) for t in self.logit_bias),
             "keys must be token ids (non-negative integers)"),
            ("logit_bias", self.logit_bias is None or all(_bias(b) for b in self.logit_bias.values()),
             f"values must be numbers in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]"),
            ("allowed_token_ids", self.allowed_token_ids is None or len(self.allowed_token_ids) > 0,
             "must not be empty (leave it out to allow every token)"),
            ("allowed_token_ids", all(_token_id(t) for t in self.allowed_token_ids or ()),
             "must hold token ids (non-negative integers)"),
            ("bad_words", all(isinstance(w, str) and w.strip() for w in self.bad_words), "must hold non-blank strings"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"SamplingParams.{name} {rule}, got {getattr(self, name)!r:.100}")

    def check_token_ids(self, vocab_size: int) -> None:
        """The token ids the request names lie in the model's vocabulary (ValueError naming the field if not)."""
        for name, ids in (("logit_bias", self.logit_bias or ()), ("allowed_token_ids", self.allowed_token_ids or ())):
            bad = next((t for t in ids if t >= vocab_size), None)
            if bad is not None:
                raise ValueError(f"SamplingParams.{name} names token id {bad}, outside the vocabulary "
                                 f"[0, {vocab_size})")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5  # vLLM's epsilon: logits / T overflows for tinier ones, which mean greedy


def _token_id(t) -> bool:
    return isinstance(t, int) and not isinstance(t, bool) and t >= 0


def _bias(b) -> bool:
    return isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b) and abs(b) <= MAX_LOGIT_BIAS
