"""Speculative decoding: vLLM's `speculative_config`, n-gram prompt-lookup proposals, verification, statistics.

A decode sequence with a proposal of k draft tokens is scheduled for 1 + k tokens; the target model scores all
of them in the step's flat batch, and `verify` accepts a prefix. The draft here is deterministic given the
context (n-gram lookup), i.e. its distribution q is one-hot on the draft token x. Rejection sampling (Leviathan
et al. 2023; Chen et al. 2023) accepts x with probability min(1, p(x) / q(x)) = p(x) and on rejection samples
from norm(max(p - q, 0)) = p with x removed. Drawing y ~ p and accepting iff y == x is that very procedure:
P(accept) = p(x), and y given y != x is distributed as p restricted to the other tokens. So the engine samples
every scored position with the ordinary sampler (temperature, top-k/p, min-p, penalties, min_tokens and seeds
define p exactly as without speculation, the draft tokens before a position counting as its context) and keeps
tokens while they equal the draft; the first one that differs, or the bonus token after a fully accepted
draft, ends the step. Greedy is the special case where y is the argmax.
"""

from dataclasses import dataclass, field

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from lmforge.engine.sequence import Sequence

METHODS = ("ngram", "draft_model")


@dataclass(frozen=True)
class SpeculativeConfig:
    """vLLM's speculative_config: {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": 4,
    "prompt_lookup_min": 1} (lookup lengths default as in vLLM: 5 and 5, or the one given for both), or a draft
    model {"model": "self", "num_speculative_tokens": k, "num_draft_layers": n}: the target's first n layers
    (default: half of them), the only draft model so far."""

    num_speculative_tokens: int
    method: str = "ngram"
    prompt_lookup_max: int | None = None
    prompt_lookup_min: int | None = None
    model: str | None = None
    num_draft_layers: int | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"speculative_config.method must be one of {list(METHODS)}, got {self.method!r}")
        ngram = self.method == "ngram"
        given = [n for n in (("prompt_lookup_max", "prompt_lookup_min") if not ngram else ("model", "num_draft_layers"))
                 if getattr(self, n) is not None]
        if given:
            raise ValueError(f"speculative_config.{given[0]} does not apply to method {self.method!r}")
        if not ngram and self.model != "self":
            raise ValueError(f"speculative_config.model {self.model!r}: only 'self' (the target's first layers as "
                             "the draft) is supported; separate draft models are not yet")
        lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
        if ngram:
            if lo is None and hi is None:
                lo = hi = 5
            lo, hi = (hi if lo is None else lo), (lo if hi is None else hi)
            object.__setattr__(self, "prompt_lookup_min", lo)
            object.__setattr__(self, "prompt_lookup_max", hi)
        names = ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min") if ngram else \
            ("num_speculative_tokens",) + (("num_draft_layers",) if self.num_draft_layers is not None else ())
        for name in names:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"speculative_config.{name} must be an integer >= 1, got {value!r}")
        if ngram and lo > hi:
            raise ValueError(f"speculative_config.prompt_lookup_min ({lo}) must not exceed prompt_lookup_max ({hi})")

    @classmethod
    def from_dict(cls, d: dict) -> "SpeculativeConfig":
        if not isinstance(d, dict):
            raise ValueError(f"speculative_config must be a JSON object (a dict), got {type(d).__name__}")
        if "model" in d and "method" not in d:
            d = {**d, "method": "draft_model"}
        known = {"method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min", "model",
                 "num_draft_layers"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"speculative_config has unknown field {unknown[0]!r}; known fields: {sorted(known)}")
        if "num_speculative_tokens" not in d:
            raise ValueError("speculative_config needs num_speculative_tokens (draft tokens per step)")
        return cls(**d)


def propose_ngram(tokens: list[int], k: int, n_max: int, n_min: int) -> list[int]:
    """Up to k tokens that followed the earliest earlier occurrence of the context's last n tokens, trying
    n = n_max down to n_min (vLLM's prompt lookup); [] when no suffix recurs."""
    length = len(tokens)
    if k < 1 or length < n_min + 1:
        return []
    arr = np.asarray(tokens, dtype=np.int64)
    for n in range(min(n_max, length - 1), n_min - 1, -1):
        # windows start at i <= length - 1 - n: a match is never the suffix itself and has a token after it
        hits = np.flatnonzero((sliding_window_view(arr[:-1], n) == arr[length - n:]).all(1))
        if hits.size:
            start = int(hits[0]) + n
            return arr[start:start + k].tolist()
    return []


def verify(draft: list[int], sampled: list[int]) -> list[int]:
    """The tokens a step emits: sampled[j] was drawn from the target at the position of draft[j] (and
    sampled[-1] after the whole draft). Keeps sampled tokens while they equal the draft, then the first that
    differs, or the bonus token when all are accepted: 1 to len(draft) + 1 tokens."""
    if len(sampled) != len(draft) + 1:
        raise ValueError(f"verify: {len(sampled)} sampled tokens for a draft of {len(draft)}; expected one more")
    accepted = 0
    while accepted < len(draft) and draft[accepted] == sampled[accepted]:
        accepted += 1
    return sampled[:accepted + 1]


@dataclass
class SpecDecodeStats:
    """Counters with vLLM's meaning: drafts proposed, draft tokens scored, draft tokens accepted (and per
    position of the draft)."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)

    def record(self, num_draft: int, num_accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_draft
        self.num_accepted_tokens += num_accepted
        for pos in range(num_accepted):
            self.accepted_per_pos[pos] += 1

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0


class NgramProposer:
    def __init__(self, config: SpeculativeConfig, max_model_len: int):
        self.config = config
        self.max_model_len = max_model_len

    def draft(self, batch) -> None:
        """Nothing to do once the step is scheduled: the n-gram drafts are known before."""

    def propose(self, running: list[Sequence]) -> None:
        """Sets spec_token_ids of each running sequence that is decoding (all but its last token computed).
        Drafts never run past max_tokens or max_model_len: every draft token could be emitted."""
        c = self.config
        for seq in running:
            if seq.num_computed_tokens != seq.num_tokens - 1:
                continue
            k = min(c.num_speculative_tokens, seq.params.max_tokens - seq.num_output_tokens - 1,
                    self.max_model_len - seq.num_tokens)
            seq.spec_token_ids = propose_ngram(seq.token_ids, k, c.prompt_lookup_max, c.prompt_lookup_min)
