"""The engine's per-token logprobs ({token id: Logprob}, sampled token first) in OpenAI's two formats, and the
prompt's (vLLM's prompt_logprobs: None for the first token, then the same dicts) in vLLM's and in OpenAI's echo."""

import math

from lmforge.engine.outputs import Logprob
from lmforge.serve.responses import (
    ChatLogprobs,
    CompletionLogprobs,
    PromptLogprob,
    PromptLogprobs,
    TokenLogprob,
    TopLogprob,
)

LOWEST = -9999.0  # what a log-prob of -inf (or NaN) reads as in JSON, as vLLM sends it


def _ranked(entry: dict[int, Logprob], k: int) -> list[Logprob]:
    """The top k alternatives in rank order (the sampled token among them when it ranks there)."""
    ranked = sorted((lp for lp in entry.values() if lp.rank is not None), key=lambda lp: lp.rank)
    return ranked[:k]


def _text(lp: Logprob) -> str:
    return lp.decoded_token or ""


def _value(lp: Logprob) -> float:
    """The log-prob as JSON can carry it: -inf (and NaN, from a model whose logits overflowed) become -9999.0, the
    floor vLLM clamps log-probs to; JSON has no infinities and OpenAI's clients expect a number."""
    return _finite(lp.logprob)


def chat_logprobs(entries: list[dict[int, Logprob]], top_k: int) -> ChatLogprobs:
    content = []
    for entry in entries:
        sampled = next(iter(entry.values()))
        top = [TopLogprob(token=_text(t), logprob=_value(t), bytes=list(_text(t).encode())) for t in _ranked(entry,
                                                                                                               top_k)]
        content.append(TokenLogprob(token=_text(sampled), logprob=_value(sampled),
                                    bytes=list(_text(sampled).encode()), top_logprobs=top))
    return ChatLogprobs(content=content)


def echo_logprobs(first_token: str, prompt: list[dict[int, Logprob] | None], generated: list[dict[int, Logprob]],
                  top_k: int) -> CompletionLogprobs:
    """An echoed choice's logprobs, OpenAI's legacy shape: the prompt's tokens first (the first one, which nothing
    scores, with null log-probs), then the generated ones. first_token: the first prompt token's text."""
    out = completion_logprobs(prompt[1:] + generated, top_k, len(first_token))
    out.tokens.insert(0, first_token)
    out.token_logprobs.insert(0, None)
    out.top_logprobs.insert(0, None)
    out.text_offset.insert(0, 0)
    return out


def prompt_logprobs_json(prompt: list[dict[int, Logprob] | None]) -> PromptLogprobs:
    """vLLM's `prompt_logprobs` field: per prompt token None (the first) or {id: {logprob, rank, decoded_token}}."""
    return [None if entry is None else {tid: PromptLogprob(logprob=_finite(lp.logprob), rank=lp.rank,
                                                           decoded_token=lp.decoded_token) for tid, lp in entry.items()}
            for entry in prompt]


def _finite(x: float) -> float:
    return x if LOWEST <= x < math.inf else LOWEST  # NaN fails the comparison too


def completion_logprobs(entries: list[dict[int, Logprob]], top_k: int, offset: int) -> CompletionLogprobs:
    """`offset`: where the first token's text starts in the choice's text (after an echoed prompt)."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    for entry in entries:
        sampled = next(iter(entry.values()))
        tokens.append(_text(sampled))
        token_logprobs.append(_value(sampled))
        alternatives = {_text(t): _value(t) for t in _ranked(entry, top_k)}
        alternatives.setdefault(_text(sampled), _value(sampled))  # vLLM includes the sampled token too
        top.append(alternatives)
        offsets.append(offset)
        offset += len(tokens[-1])
    return CompletionLogprobs(tokens=tokens, token_logprobs=token_logprobs, top_logprobs=top, text_offset=offsets)
