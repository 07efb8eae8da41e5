"""Hot path: keep minimal; optional features live in their own functions, called from `sample` only.

One decode step's next tokens for a batch: logits [N, V] and one SamplingRow per row. Logit constraints
(allowed_token_ids, bad_words, logit_bias: logits_processors.py), penalties and min_tokens (HF / OpenAI / vLLM
semantics) apply first; greedy rows then take the argmax, the others go through temperature ->
top-k -> top-p -> min-p (HF's order; vLLM v1 applies min-p before top-k/top-p) and an exponential race, which
lets a seeded row draw its noise from its own generator. Cut-offs are found among each row's CANDIDATES largest
logits, and rows whose kept tokens all lie there race there too; a full sort is for the rare row they cannot
settle (lmforge/engine/truncation.py). Log-probs come from the raw logits by default, so they match a training
forward's log_softmax bit for bit; logprobs_mode="processed_logprobs" reports them under the distribution each token
was drawn from instead (`_processed`). A grammar bitmask (structured output) masks its rows' disallowed tokens to
-inf before anything else; other rows are untouched.
"""

from dataclasses import dataclass
from itertools import chain

import torch

from lmforge.engine.logits_processors import apply_constraints, constrained
from lmforge.engine.sampling_params import SamplingParams
from lmforge.engine.structured import apply_bitmask
from lmforge.engine.truncation import cutoffs, dropped
from lmforge.kernels import usable


@dataclass(slots=True)
class SamplingRow:
    """One row of the logits matrix: the sequence being sampled and what it has produced so far."""

    params: SamplingParams
    generator: torch.Generator | None  # set for seeded requests; None: the shared RNG
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    eos_token_ids: frozenset[int]


@dataclass(slots=True)
class SampleResult:
    token_ids: list[int]
    logprobs: list[float] | None  # each sampled token's, as logprobs_mode says; None when no row asked
    top_logprobs: list[list[tuple[int, float]]] | None  # per row its params.logprobs best (id, logprob), else []


def sample(logits: torch.Tensor, rows: list[SamplingRow], grammar: tuple[torch.Tensor, list[int]] | None = None,
           generator: torch.Generator | None = None, logprobs_mode: str = "raw_logprobs") -> SampleResult:
    """logits [N, V] (any float dtype; fp32 is used beyond greedy), row i belonging to rows[i] -> one token per row
    (and log-probs where asked). grammar: a packed allowed-token bitmask and the rows it constrains
    (lmforge/engine/structured.py). generator: the draws of rows without their own (the engine's; None: torch's
    global one). logprobs_mode: what the log-probs are (EngineConfig.logprobs_mode)."""
    if logits.dim() != 2 or logits.shape[0] != len(rows):
        raise ValueError(f"sample: logits of shape {tuple(logits.shape)} for {len(rows)} rows; expected [rows, vocab]")
    if not rows:
        return SampleResult([], None, None)
    params = [r.params for r in rows]
    greedy = [p.greedy for p in params]
    penalised = [i for i, p in enumerate(params)
                 if p.repetition_penalty != 1 or p.presence_penalty or p.frequency_penalty]
    held = [i for i, r in enumerate(rows) if len(r.output_token_ids) < r.params.min_tokens]
    limited = [i for i, p in enumerate(params) if constrained(p)]
    want_logprobs = any(p.logprobs is not None for p in params)
    if all(greedy) and not penalised and not held and not limited and not want_logprobs and grammar is None:
        return SampleResult(_argmax(logits).tolist(), None, None)

    logits = logits.float()  # exact for bf16: the argmax and the log-probs are those of the widened values
    work = logits
    if penalised or held or limited or grammar is not None:
        work = logits.clone()  # the raw logits stay untouched for the log-probs
        if limited:
            apply_constraints(work, params, [r.output_token_ids for r in rows], limited)
        if grammar is not None:
            apply_bitmask(work, *grammar)
        if penalised:
            _apply_penalties(work, rows, penalised)
        if held:
            _mask_stop_tokens(work, rows, held)
    tokens = torch.empty(len(rows), dtype=torch.long, device=logits.device)
    greedy_idx = [i for i, g in enumerate(greedy) if g]
    random_idx = [i for i, g in enumerate(greedy) if not g]
    if greedy_idx:
        tokens[greedy_idx] = (work if not random_idx else work[greedy_idx]).argmax(-1)
    truncated = None
    if random_idx:
        owned = work is not logits or bool(greedy_idx)
        tokens[random_idx], truncated = _sample_random(work if not greedy_idx else work[random_idx],
                                                       [rows[i] for i in random_idx], owned, generator)
    token_ids = tokens.tolist()
    if not want_logprobs:
        return SampleResult(token_ids, None, None)
    if logprobs_mode == "raw_logprobs":
        return _logprobs(torch.log_softmax(logits, -1), tokens, token_ids, params)
    if logprobs_mode == "raw_logits":
        return _logprobs(logits, tokens, token_ids, params)
    scores = _processed(work, greedy_idx, random_idx, truncated)
    if logprobs_mode == "processed_logprobs":
        scores = torch.log_softmax(scores, -1)
    return _logprobs(scores, tokens, token_ids, params)


def _argmax(x: torch.Tensor) -> torch.Tensor:
    """Row-wise argmax (first of equal maxima): the CPU kernel reads bf16 logits directly; elsewhere max(-1), which
    torch runs faster than its argmax (docs/benchmarks.md, "Numbers behind code comments")."""
    if (ops := usable(x)) is not None and x.is_contiguous():
        return ops.argmax_rows(x)
    return x.max(-1).indices


Truncation = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]  # tempered logits, cut-off, min_p


def _sample_random(x: torch.Tensor, rows: list[SamplingRow], owned: bool, shared: torch.Generator | None
                   ) -> tuple[torch.Tensor, Truncation]:
    """x [M, V] penalised logits of the non-greedy rows (modified in place when `owned`) -> token ids [M], and the
    tempered logits with the cut-offs the draw used (for processed log-probs; nothing extra is computed)."""
    m, v = x.shape
    dev = x.device
    params = [r.params for r in rows]
    gens = [r.generator for r in rows]
    temps = torch.tensor([p.temperature for p in params], dtype=x.dtype, device=dev)[:, None]
    x = x.div_(temps) if owned else x / temps
    min_p = None
    if any(p.min_p for p in params):
        min_p = torch.tensor([p.min_p for p in params], dtype=x.dtype, device=dev)[:, None]
    top_k = [p.top_k if 0 < p.top_k < v else v for p in params]  # v: no top-k cut
    if all(k == v for k in top_k) and all(p.top_p >= 1 for p in params):
        return _race(_probs(x, None, min_p), gens, shared), (x, None, min_p)
    k = torch.tensor(top_k, device=dev)
    vals, idx, cut = cutoffs(x, k, torch.tensor([p.top_p for p in params], dtype=x.dtype, device=dev))
    # Rows whose kept logits all lie among their candidates race there: a few hundred columns, not the vocabulary.
    # Whether a row does depends on its own logits only, so seeded rows draw the same noise in any batch.
    inside = ((vals[:, -1:] < cut)[:, 0] | (vals.shape[1] == v)).tolist()
    tokens = torch.empty(m, dtype=torch.long, device=dev)
    for space in (True, False):
        group = [i for i, f in enumerate(inside) if f is space]
        if not group:
            continue
        sel = slice(None) if len(group) == m else group
        mp = None if min_p is None else min_p[sel]
        if space:
            pick = _race(_probs(vals[sel], cut[sel], mp), [gens[i] for i in group], shared)
            tokens[sel] = idx[sel].gather(1, pick[:, None])[:, 0]
        else:
            tokens[sel] = _race(_probs(x[sel], cut[sel], mp), [gens[i] for i in group], shared)
    return tokens, (x, cut, min_p)


def _probs(x: torch.Tensor, cut: torch.Tensor | None, min_p: torch.Tensor | None) -> torch.Tensor:
    """exp(x - max): unnormalised probabilities (the race needs no normalising), zero where truncation.dropped
    says: below each row's cut-off logit and, as HF's min-p, where prob < min_p * max prob (max prob is 1 here)."""
    e = (x - x.amax(-1, keepdim=True)).exp_()
    drop = dropped(x, cut, min_p, e)
    return e if drop is None else e.masked_fill_(drop, 0.0)


def _race(probs: torch.Tensor, generators: list[torch.Generator | None], shared: torch.Generator | None
          ) -> torch.Tensor:
    """argmax(p / q) with q ~ Exp(1) per token picks token t with probability p_t / sum(p). Seeded rows draw q
    from their own generator, so their pick depends on nothing else in the batch; the rest share one draw."""
    u = torch.empty_like(probs)
    if any(g is None for g in generators):
        u.uniform_(generator=shared)
    for i, g in enumerate(generators):
        if g is not None:
            u[i].uniform_(generator=g)
    # -log(u) is Exp(1) and several times cheaper than exponential_() on CPU. The clamp keeps q finite: a row
    # whose only surviving token drew u = 0 would otherwise score 0 everywhere and argmax a masked token.
    return probs.div_(u.clamp_min_(torch.finfo(u.dtype).tiny).log_().neg_()).argmax(-1)


def _apply_penalties(logits: torch.Tensor, rows: list[SamplingRow], idx: list[int]) -> None:
    """In place on rows idx: HF repetition penalty over prompt + output tokens (positive logits divided,
    negative multiplied), then OpenAI presence / frequency over output tokens."""
    sub = logits[idx]
    n, v = sub.shape
    dev = logits.device
    params = [rows[i].params for i in idx]
    rep = [j for j, p in enumerate(params) if p.repetition_penalty != 1]
    if rep:
        seen = torch.zeros(n, v, dtype=torch.bool, device=dev)
        seqs = [rows[idx[j]].prompt_token_ids + rows[idx[j]].output_token_ids for j in rep]
        seen[_flat_index(rep, seqs, dev)] = True
        pen = torch.tensor([p.repetition_penalty for p in params], dtype=sub.dtype, device=dev)[:, None]
        sub = torch.where(seen, torch.where(sub < 0, sub * pen, sub / pen), sub)
    pf = [j for j, p in enumerate(params) if p.presence_penalty or p.frequency_penalty]
    if pf:
        counts = torch.zeros(n, v, dtype=sub.dtype, device=dev)
        seqs = [rows[idx[j]].output_token_ids for j in pf]
        counts.index_put_(_flat_index(pf, seqs, dev), torch.ones((), dtype=sub.dtype, device=dev), accumulate=True)
        freq = torch.tensor([p.frequency_penalty for p in params], dtype=sub.dtype, device=dev)[:, None]
        pres = torch.tensor([p.presence_penalty for p in params], dtype=sub.dtype, device=dev)[:, None]
        sub = sub - freq * counts - pres * (counts > 0)
    logits[idx] = sub


def _flat_index(row_ids: list[int], seqs: list[list[int]], dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, token) index tensors for every token of seqs[j], in row row_ids[j]; no per-token Python loop."""
    lengths = torch.tensor([len(s) for s in seqs], device=dev)
    rows = torch.repeat_interleave(torch.tensor(row_ids, device=dev), lengths)
    return rows, torch.tensor(list(chain.from_iterable(seqs)), dtype=torch.long, device=dev)


def _mask_stop_tokens(logits: torch.Tensor, rows: list[SamplingRow], held: list[int]) -> None:
    """In place: rows short of min_tokens cannot end yet; stop_token_ids always, EOS unless ignore_eos."""
    v = logits.shape[1]
    r, t = [], []
    for i in held:
        p = rows[i].params
        stops = set(p.stop_token_ids) if p.ignore_eos else set(p.stop_token_ids) | rows[i].eos_token_ids
        ids = [s for s in stops if 0 <= s < v]  # ids past the vocabulary can never be sampled anyway
        r += [i] * len(ids)
        t += ids
    if t:
        logits[r, t] = float("-inf")


def _processed(work: torch.Tensor, greedy_idx: list[int], random_idx: list[int], truncated: Truncation | None
               ) -> torch.Tensor:
    """[N, V] the logits each row was drawn from: sampled rows' tempered logits with their dropped tokens at -inf;
    greedy rows' `work` as it is (constraints and penalties applied, no temperature, no cut-offs), which is what
    vLLM reports for them (its greedy rows skip temperature, and its SamplingParams turn top-k/p and min-p off)."""
    if truncated is None:
        return work
    x, cut, min_p = truncated  # x: a tensor the sampler made for this step, free to change
    drop = dropped(x, cut, min_p)
    if drop is not None:
        x.masked_fill_(drop, float("-inf"))
    if not greedy_idx:
        return x
    out = torch.empty_like(work)
    out[greedy_idx] = work[greedy_idx]
    out[random_idx] = x
    return out


def _logprobs(lp: torch.Tensor, tokens: torch.Tensor, token_ids: list[int], params: list[SamplingParams]
              ) -> SampleResult:
    """lp [N, V] the scores to report (log-probs, or logits in the *_logits modes): the sampled token's for every
    row, the top-k for rows that ask."""
    sampled = lp.gather(1, tokens[:, None])[:, 0].tolist()
    top: list[list[tuple[int, float]]] = [[] for _ in params]
    ask = [i for i, p in enumerate(params) if p.logprobs]
    if ask:
        vals, ids = lp[ask].topk(max(params[i].logprobs for i in ask), -1)
        for i, vs, ts in zip(ask, vals.tolist(), ids.tolist(), strict=True):
            k = params[i].logprobs
            top[i] = list(zip(ts[:k], vs[:k], strict=True))
    return SampleResult(token_ids, sampled, top)
