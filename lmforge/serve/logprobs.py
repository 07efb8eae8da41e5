"""The engine's per-token logprobs ({token id: Logprob}, sampled token first) in OpenAI's two formats."""

import math

from lmforge.engine.outputs import Logprob
from lmforge.serve.protocol import ChatLogprobs, CompletionLogprobs, TokenLogprob, TopLogprob

NO_LOGPROB = -9999.0


def _ranked(entry: dict[int, Logprob], k: int) -> list[Logprob]:
    """The top k alternatives in rank order (the sampled token among them when it ranks there)."""
    ranked = sorted((lp for lp in entry.values() if lp.rank is not None), key=lambda lp: lp.rank)
    return ranked[:k]


def _text(lp: Logprob) -> str:
    return lp.decoded_token or ""


def _value(lp: Logprob) -> float:
    """The log-prob as JSON can carry it: -inf (and NaN, from a model whose logits overflowed) become -9999.0, the
    floor vLLM clamps log-probs to; JSON has no infinities and OpenAI's clients expect a number."""
    return lp.logprob if math.isfinite(lp.logprob) else NO_LOGPROB


def chat_logprobs(entries: list[dict[int, Logprob]], top_k: int) -> ChatLogprobs:
    content = []
    for entry in entries:
        sampled = next(iter(entry.values()))
        top = [TopLogprob(token=_text(t), logprob=_value(t), bytes=list(_text(t).encode())) for t in _ranked(entry,
                                                                                                               top_k)]
        content.append(TokenLogprob(token=_text(sampled), logprob=_value(sampled),
                                    bytes=list(_text(sampled).encode()), top_logprobs=top))
    return ChatLogprobs(content=content)


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
