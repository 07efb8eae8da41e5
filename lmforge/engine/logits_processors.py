"""vLLM's per-request logit constraints: allowed_token_ids, bad_words and logit_bias.

The sampler applies them, in vLLM's order (allowed tokens, bad words, bias), to a copy of the rows that set them,
before penalties, temperature and top-k/top-p; every step works on the rows it names only, so a request's constraints
never reach its neighbours. Log-probs stay those of the raw logits, as the sampler's always are.
"""

import dataclasses
from itertools import chain

import torch

from lmforge.engine.sampling_params import SamplingParams


def constrained(params: SamplingParams) -> bool:
    return bool(params.allowed_token_ids or params.bad_words_token_ids or params.logit_bias)


def resolve_constraints(params: SamplingParams, tokenizer, vocab_size: int) -> SamplingParams:
    """params with their token ids checked against the model's vocabulary (ValueError naming the field) and their
    bad_words tokenised (vLLM's update_from_tokenizer)."""
    params.check_token_ids(vocab_size)
    if not params.bad_words:
        return params
    ids = bad_words_token_ids(params.bad_words, lambda text: tokenizer.encode(text, add_special_tokens=False))
    return dataclasses.replace(params, bad_words_token_ids=ids)


def bad_words_token_ids(words: tuple[str, ...], encode) -> tuple[tuple[int, ...], ...]:
    """Each word's tokens as it would appear at the start of the text and after a space (vLLM's rule: the spaced
    form only when it is a different token sequence of the same length). encode: text -> ids, no special tokens."""
    out: list[tuple[int, ...]] = []
    for word in words:
        bare = tuple(encode(word.lstrip()))
        if bare:
            out.append(bare)
        spaced = tuple(encode(" " + word.lstrip()))
        if spaced and (not bare or (spaced[0] != bare[0] and len(spaced) == len(bare))):
            out.append(spaced)
    return tuple(out)


def apply_constraints(logits: torch.Tensor, params: list[SamplingParams], outputs: list[list[int]],
                      idx: list[int]) -> None:
    """In place on rows idx of logits [N, V]: tokens outside allowed_token_ids and the banned last token of each bad
    word whose other tokens end the output so far go to -inf; logit_bias is added."""
    v, dev = logits.shape[1], logits.device
    allowed = [i for i in idx if params[i].allowed_token_ids]
    if allowed:
        keep = torch.zeros(len(allowed), v, dtype=torch.bool, device=dev)
        ids = [params[i].allowed_token_ids for i in allowed]
        keep[_rows_of(range(len(allowed)), ids, dev), _tokens(ids, dev)] = True
        logits[allowed] = logits[allowed].masked_fill_(~keep, float("-inf"))
    rows, banned = [], []
    for i in idx:
        out = outputs[i]
        for word in params[i].bad_words_token_ids:
            prefix = len(word) - 1
            if prefix <= len(out) and (prefix == 0 or tuple(out[-prefix:]) == word[:-1]):
                rows.append(i)
                banned.append(word[-1])
    if banned:
        logits[torch.tensor(rows, device=dev), torch.tensor(banned, device=dev)] = float("-inf")
    biased = [i for i in idx if params[i].logit_bias]
    if biased:
        ids = [list(params[i].logit_bias) for i in biased]
        values = torch.tensor(list(chain.from_iterable(params[i].logit_bias.values() for i in biased)),
                              dtype=logits.dtype, device=dev)
        logits.index_put_((_rows_of(biased, ids, dev), _tokens(ids, dev)), values, accumulate=True)


def _rows_of(rows, seqs, dev: torch.device) -> torch.Tensor:
    """rows[j] repeated once per element of seqs[j]."""
    return torch.repeat_interleave(torch.tensor(list(rows), device=dev),
                                   torch.tensor([len(s) for s in seqs], device=dev))


def _tokens(seqs, dev: torch.device) -> torch.Tensor:
    return torch.tensor(list(chain.from_iterable(seqs)), dtype=torch.long, device=dev)
