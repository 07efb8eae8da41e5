"""The engine's per-token logprobs ({token id: Logprob}, sampled token first) in OpenAI's two formats."""

from lmforge.engine.outputs import Logprob
from lmforge.serve.protocol import ChatLogprobs, CompletionLogprobs, TokenLogprob, TopLogprob


def _ranked(entry: dict[int, Logprob], k: int) -> list[Logprob]:
    """The top k alternatives in rank order (the sampled token among them when it ranks there)."""
    ranked = sorted((lp for lp in entry.values() if lp.rank is not None), key=lambda lp: lp.rank)
    return ranked[:k]


def _text(lp: Logprob) -> str:
    return lp.decoded_token or ""


def chat_logprobs(entries: list[dict[int, Logprob]], top_k: int) -> ChatLogprobs:
    content = []
    for entry in entries:
        sampled = next(iter(entry.values()))
        top = [TopLogprob(token=_text(t), logprob=t.logprob, bytes=list(_text(t).encode())) for t in _ranked(entry,
                                                                                                               top_k)]
        content.append(TokenLogprob(token=_text(sampled), logprob=sampled.logprob,
                                    bytes=list(_text(sampled).encode()), top_logprobs=top))
    return ChatLogprobs(content=content)


def completion_logprobs(entries: list[dict[int, Logprob]], top_k: int, offset: int) -> CompletionLogprobs:
    """`offset`: where the first token's text starts in the choice's text (after an echoed prompt)."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    for entry in entries:
        sampled = next(iter(entry.values()))
        tokens.append(_text(sampled))
        token_logprobs.append(sampled.logprob)
        alternatives = {_text(t): t.logprob for t in _ranked(entry, top_k)}
        alternatives.setdefault(_text(sampled), sampled.logprob)  # vLLM includes the sampled token too
        top.append(alternatives)
        offsets.append(offset)
        offset += len(tokens[-1])
    return CompletionLogprobs(tokens=tokens, token_logprobs=token_logprobs, top_logprobs=top, text_offset=offsets)
