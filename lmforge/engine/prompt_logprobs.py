"""Log-probs of the prompt's own tokens (vLLM's `prompt_logprobs`), computed from the prefill's forward pass.

The hidden state at prompt position p scores prompt token p + 1. A sequence that wants them (the first of a request
with prompt_logprobs set) gets logits at every prompt position of its prefill steps, chunked prefill included, not only
at the last; every other sequence keeps the last-position-only path. The rows are reduced in chunks of ROWS_PER_CHUNK
(the actual token's log-prob and rank, the top k), so a long prompt never holds [prompt, vocab] logits at once.
Such a sequence takes no prefix-cache hits until all its prompt tokens are scored (a cached position has no hidden
state here), as vLLM does; its blocks are still published for others.
"""

from dataclasses import dataclass

import torch
from torch import nn

from lmforge.engine.outputs import Logprob
from lmforge.engine.sequence import Sequence

ROWS_PER_CHUNK = 256  # 256 x a 150k vocabulary in fp32 is 150 MB: the most one chunk of prompt logits holds


@dataclass(slots=True)
class PromptScores:
    """One step's scores of one sequence's prompt tokens first .. first + len(logprobs) - 1."""

    seq: Sequence
    first: int  # index in the prompt of the first token scored (>= 1)
    logprobs: list[float]  # each token's log-prob under the model
    ranks: list[int]  # 1 + the number of tokens the model found strictly more likely
    top: list[list[tuple[int, float]]]  # the k most likely (id, log-prob), best first


def prompt_rows(seqs: list[Sequence], num_new_tokens: list[int]) -> tuple[list[int], list[int], list[int], list]:
    """The hidden-state rows of a step (sequences laid end to end as scheduled) that score prompt tokens of the
    sequences that want them: (rows, the tokens they score, each one's top k, (seq, first, count) per sequence)."""
    rows, targets, ks, spans = [], [], [], []
    offset = 0
    for seq, n in zip(seqs, num_new_tokens, strict=True):
        start = seq.num_computed_tokens
        end = min(start + n, seq.num_prompt_tokens - 1)  # the last prompt position samples the first output token
        if seq.needs_prompt_logprobs and start < end:
            rows.extend(range(offset, offset + end - start))
            targets.extend(seq.token_ids[start + 1:end + 1])
            ks.extend([seq.params.prompt_logprobs] * (end - start))
            spans.append((seq, start + 1, end - start))
        offset += n
    return rows, targets, ks, spans


def prompt_logits(model: nn.Module, hidden: torch.Tensor, rows: list[int]):
    """Float32 logits of `rows` of the hidden states, ROWS_PER_CHUNK at a time (yielded per chunk). Tensor-parallel
    workers make the same calls, whose head gathers the vocabulary slices."""
    for i in range(0, len(rows), ROWS_PER_CHUNK):
        yield i, model.logits(hidden[torch.tensor(rows[i: i + ROWS_PER_CHUNK], device=hidden.device)], float32=True)


def score_prompt_tokens(model: nn.Module, hidden: torch.Tensor, seqs: list[Sequence],
                        num_new_tokens: list[int]) -> list[PromptScores]:
    """hidden: the step's [num_tokens, hidden] states, sequences laid end to end as scheduled. Scores the prompt
    tokens that this step's positions predict, for the sequences that want them."""
    rows, targets, ks, spans = prompt_rows(seqs, num_new_tokens)
    if not rows:
        return []
    lps, ranks, top = [], [], []
    for i, logits in prompt_logits(model, hidden, rows):
        chunk = slice(i, i + ROWS_PER_CHUNK)
        lp, rank, best = _reduce(torch.log_softmax(logits, -1), torch.tensor(targets[chunk], device=hidden.device),
                                 ks[chunk])
        lps += lp
        ranks += rank
        top += best
    out, at = [], 0
    for seq, first, count in spans:
        out.append(PromptScores(seq, first, lps[at:at + count], ranks[at:at + count], top[at:at + count]))
        at += count
    return out


def _reduce(lp: torch.Tensor, targets: torch.Tensor, ks: list[int]
            ) -> tuple[list[float], list[int], list[list[tuple[int, float]]]]:
    actual = lp.gather(1, targets[:, None])
    ranks = (lp > actual).sum(-1).add_(1).tolist()
    k = max(ks)
    best: list[list[tuple[int, float]]] = [[] for _ in ks]
    if k:
        vals, ids = lp.topk(k, -1)
        best = [list(zip(t[:kr], v[:kr], strict=True)) for t, v, kr in zip(ids.tolist(), vals.tolist(), ks,
                                                                            strict=True)]
    return actual[:, 0].tolist(), ranks, best


def record_prompt_logprobs(scores: PromptScores, into: list[dict[int, Logprob] | None], tokenizer) -> None:
    """Appends the step's entries to the request's prompt_logprobs (into, which starts as [None]), skipping tokens
    already there (a sequence preempted mid-prefill scores its prompt again); once every prompt token is in, the
    sequence no longer needs its prompt scored (and may take prefix-cache hits when it is recomputed)."""
    ids = scores.seq.token_ids
    assert len(into) >= scores.first, "a sequence's prompt scores arrived out of order"
    for j in range(len(into) - scores.first, len(scores.logprobs)):
        into.append(_entry(ids[scores.first + j], scores.logprobs[j], scores.ranks[j], scores.top[j], tokenizer))
    if len(into) >= scores.seq.num_prompt_tokens:
        scores.seq.needs_prompt_logprobs = False


def _entry(token: int, lp: float, rank: int, top: list[tuple[int, float]], tokenizer) -> dict[int, Logprob]:
    """vLLM's shape: the actual token first (with its rank), then the top k in rank order."""
    entry = {token: Logprob(lp, rank, tokenizer.decode([token], skip_special_tokens=False))}
    for r, (tid, value) in enumerate(top, start=1):
        if tid != token:
            entry[tid] = Logprob(value, r, tokenizer.decode([tid], skip_special_tokens=False))
    return entry
