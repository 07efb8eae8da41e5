"""Per-request generation settings, with vLLM's names and defaults; invalid values fail before queueing."""

import json as jsonlib
import math
from dataclasses import dataclass, field

MAX_LOGPROBS = 20  # top alternatives per token, sampled or prompt (vLLM's default max_logprobs)
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for logit_bias values: [-100, 100]
CONSTRAINTS = ("json", "regex", "choice", "grammar", "json_object")


@dataclass(frozen=True)
class StructuredOutputsParams:
    """vLLM's structured output constraint: exactly one of a JSON schema (dict or JSON text), a regex, a list of
    choices, an EBNF/GBNF grammar, or json_object=True (any JSON object). Compiled by lmforge/engine/structured.py."""

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | tuple[str, ...] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False  # JSON without whitespace between tokens
    disable_additional_properties: bool = False  # accepted for vLLM parity: lmforge's JSON mode is always strict

    def __post_init__(self):
        given = [name for name in CONSTRAINTS if getattr(self, name) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"StructuredOutputsParams needs exactly one of {', '.join(CONSTRAINTS)}; got "
                             f"{', '.join(given) or 'none'}")
        if self.choice is not None:
            if not self.choice or not all(isinstance(c, str) and c for c in self.choice):
                raise ValueError("StructuredOutputsParams.choice must be a non-empty list of non-empty strings")
            object.__setattr__(self, "choice", tuple(self.choice))
        if isinstance(self.json, str):
            try:
                object.__setattr__(self, "json", jsonlib.loads(self.json))
            except ValueError as e:
                raise ValueError(f"StructuredOutputsParams.json is not valid JSON ({e})") from None
        if self.json is not None and not isinstance(self.json, (dict, bool)):
            raise ValueError("StructuredOutputsParams.json must be a JSON schema object")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"StructuredOutputsParams.{name} must be a non-empty string")

    @property
    def kind(self) -> str:
        return next(name for name in CONSTRAINTS if getattr(self, name) not in (None, False))

    def key(self) -> str:
        """What identifies the compiled grammar: equal keys share one compilation."""
        return jsonlib.dumps([self.kind, getattr(self, self.kind), self.disable_any_whitespace], sort_keys=True)


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
    structured_outputs: StructuredOutputsParams | None = None  # constrain the output (JSON schema, regex, ...)
    # set by the engine from bad_words and its tokenizer (vLLM's _bad_words_token_ids); not for users to fill
    bad_words_token_ids: tuple[tuple[int, ...], ...] = field(default=(), compare=False, repr=False)

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        if isinstance(self.structured_outputs, dict):
            object.__setattr__(self, "structured_outputs", StructuredOutputsParams(**self.structured_outputs))
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
            ("top_k", 0 <= self.top_k < 2**31, "must be >= 0 (0 or -1 disables it) and < 2**31"),
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
            ("stop_token_ids", all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "must hold ids >= 0"),
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
