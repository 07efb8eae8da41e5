"""Hot path (the sampler's cut-offs): keep minimal.

Which tokens a sampled row keeps: after the temperature, top-k -> top-p -> min-p (HF's order), one definition for
the sampler (engine/sampler.py) and for a trainer that needs the distribution a token was actually drawn from
(`processed_log_probs`, differentiable: GRPO's importance ratios). Imports torch only (and SamplingParams' checks),
so a trainer loads it without the engine.

Ties: every logit equal to a row's cut-off is kept, for top-k as HF's TopKLogitsWarper does and for top-p too,
where HF's TopPLogitsWarper walks its sorted order one token at a time and may keep only some of the tied tokens
(which ones depends on the sort). Away from exact ties the two agree (tests/unit/test_processed_logprobs.py).
"""

import torch

from lmforge.engine.sampling_params import SamplingParams

CANDIDATES = 256  # top-k / top-p cut-offs are looked for among each row's largest logits before any full sort


def cutoffs(x: torch.Tensor, k: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, V] tempered logits, k [M] (V: no top-k), p [M] (1: no top-p) -> each row's CANDIDATES largest logits
    (descending) with their ids, and its cut-off: the smallest logit kept by top-k then top-p ([M, 1], -inf: no
    cut). Only rows whose cut-off the candidates cannot settle (a nucleus reaching past them, or a top-k tie running
    past them) are fully sorted."""
    v = x.shape[1]
    vals, idx = x.topk(CANDIDATES, -1) if CANDIDATES < v else x.sort(-1, descending=True)
    cut, settled = _cutoff_from_sorted(vals, x, k, p)
    redo = (~settled).nonzero()[:, 0]
    if len(redo):
        xs = x[redo]
        cut[redo] = _cutoff_from_sorted(xs.sort(-1, descending=True).values, xs, k[redo], p[redo])[0]
    return vals, idx, cut


def _cutoff_from_sorted(desc: torch.Tensor, x: torch.Tensor, k: torch.Tensor, p: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """desc: each row's largest logits sorted descending, all V or a prefix. -> the cut-off ([M, 1]) and whether
    the prefix was long enough to settle it ([M])."""
    m, w = desc.shape
    v = x.shape[1]
    has_k = k < v
    kth = desc.gather(1, (k.clamp(max=w) - 1)[:, None]).masked_fill_(~has_k[:, None], float("-inf"))
    settled = (desc[:, -1] < kth[:, 0]) | ~has_k | (w == v)
    nucleus = p < 1
    if not nucleus.any():
        return kth, settled
    # top-p renormalises over the top-k survivors: within the prefix for settled top-k rows, else the whole row
    e = (desc - desc[:, :1]).exp_().masked_fill_(desc < kth, 0.0)
    total = e.sum(-1)
    whole = (~has_k & nucleus).nonzero()[:, 0] if w < v else []
    if len(whole):
        xs = x if len(whole) == m else x[whole]
        ds = desc if len(whole) == m else desc[whole]
        total[whole] = (xs - ds[:, :1]).exp_().sum(-1)
    above = e.cumsum(-1).sub_(e)  # mass of the strictly larger logits: a logit is kept while that is < top_p
    # at least the top logit: a top_p so small that p * total underflows to 0 still keeps one token (as HF's)
    kept = (above < (p * total)[:, None]).sum(-1).clamp_(min=1)
    cut = desc.gather(1, (kept - 1)[:, None]).masked_fill_(~nucleus[:, None], float("-inf"))
    settled &= ~(nucleus & ~has_k & (kept == w)) | (w == v)
    return torch.maximum(kth, cut), settled


def dropped(x: torch.Tensor, cut: torch.Tensor | None, min_p: torch.Tensor | None,
            rel: torch.Tensor | None = None) -> torch.Tensor | None:
    """True where a row drops a token of x (tempered logits, or a prefix of each row's largest): below the row's
    cut-off logit (top-k / top-p), or, as HF's min-p, with probability under min_p x the row's top probability.
    cut [M, 1] and min_p [M, 1] as the sampler holds them (None: no such cut); rel: exp(x - row max) if the caller
    has it. None when nothing is dropped."""
    drop = None if cut is None else x < cut
    if min_p is not None:
        if rel is None:
            rel = (x - x.amax(-1, keepdim=True)).exp_()
        low = rel < min_p  # the top probability is exp(0) = 1 here
        drop = low if drop is None else drop.logical_or_(low)
    return drop


def processed_log_probs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float, top_k: int = 0,
                        top_p: float = 1.0, min_p: float = 0.0) -> torch.Tensor:
    """logits [N, V], tokens [N] -> [N]: each token's log-prob under the distribution the engine samples from with
    these settings (EngineConfig.logprobs_mode="processed_logprobs" returns the same numbers): logits / temperature,
    tokens outside top-k / top-p / min-p at -inf, log-softmaxed. Computed in float32, as the sampler does. The kept
    set is found without gradient; the log-softmax over it carries the gradient to `logits`. A greedy temperature
    (< 1e-5) gives log_softmax(logits), as the engine and vLLM report greedy rows. Pass the logits the engine
    sampled from (after any logit_bias / penalties / grammar mask the request had). A token outside the kept set
    gets -inf: with logits that differ slightly from the engine's (another dtype, another kernel) a token at the
    edge of the nucleus can fall out."""
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)  # one checked range
    if logits.dim() != 2 or tokens.shape != logits.shape[:1]:
        raise ValueError(f"processed_log_probs: logits {tuple(logits.shape)} and tokens {tuple(tokens.shape)}; "
                         "expected [N, V] and [N]")
    logits = logits.float()
    n, v = logits.shape
    if not params.greedy:
        # the same broadcast division the sampler runs, so the values agree bit for bit
        logits = logits / logits.new_full((n, 1), params.temperature)
        with torch.no_grad():
            x = logits.detach()
            cut = None
            if 0 < params.top_k < v or params.top_p < 1:
                k = torch.full((n,), params.top_k if 0 < params.top_k < v else v, device=x.device)
                cut = cutoffs(x, k, x.new_full((n,), params.top_p))[2]
            drop = dropped(x, cut, x.new_full((n, 1), params.min_p) if params.min_p else None)
        if drop is not None:
            logits = logits.masked_fill(drop, float("-inf"))
    return logits.log_softmax(-1).gather(1, tokens[:, None].long())[:, 0]
