import pytest
import torch

from lmforge.engine import sampler, truncation
from lmforge.engine.sampler import SamplingRow, sample
from lmforge.engine.sampling_params import SamplingParams

# A vocabulary wider than the sampler's candidate set, so both the candidate and the whole-vocabulary paths run
V = 4 * truncation.CANDIDATES


def row(prompt=(1, 2), output=(), eos=frozenset({0}), seed=None, **params) -> SamplingRow:
    gen = None if seed is None else torch.Generator().manual_seed(seed)  # as the engine makes it from params.seed
    return SamplingRow(SamplingParams(seed=seed, **params), gen, list(prompt), list(output), eos)


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_greedy_is_argmax_on_the_fast_path():
    logits = torch.randn(5, V)
    result = sample(logits, [row(temperature=0) for _ in range(5)])
    assert result.token_ids == logits.argmax(-1).tolist()
    assert result.logprobs is None and result.top_logprobs is None
    # temperatures too small to divide by are greedy too
    assert sample(logits, [row(temperature=1e-7) for _ in range(5)]).token_ids == result.token_ids
    assert sample(torch.empty(0, V), []).token_ids == []
    with pytest.raises(ValueError, match="rows"):
        sample(logits, [row()])


def test_repetition_penalty_matches_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    logits = torch.randn(3, 40) * 3
    rows = [row(prompt=[3, 5, 5, 7], output=[9, 3], repetition_penalty=1.3),
            row(prompt=[1], output=[2]),  # no penalty: left alone
            row(prompt=[0, 39], output=[], repetition_penalty=0.8)]
    out = logits.clone()
    sampler._apply_penalties(out, rows, [0, 2])
    for i in (0, 2):
        ids = torch.tensor([rows[i].prompt_token_ids + rows[i].output_token_ids])
        ref = RepetitionPenaltyLogitsProcessor(rows[i].params.repetition_penalty)(ids, logits[i : i + 1].clone())
        torch.testing.assert_close(out[i], ref[0], rtol=0, atol=0)
    assert torch.equal(out[1], logits[1])


def test_presence_and_frequency_penalties_by_hand():
    logits = torch.tensor([[1.0, 2.0, 3.0, -1.0, 0.5, 0.0]] * 2)
    rows = [row(prompt=[4], output=[2, 2, 3], presence_penalty=0.5, frequency_penalty=0.25),
            row(prompt=[4], output=[2, 2, 3], presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=2.0)]
    out = logits.clone()
    sampler._apply_penalties(out, rows, [0, 1])
    # output counts: token 2 twice, token 3 once; the prompt's token 4 only meets the repetition penalty
    assert out[0].tolist() == [1.0, 2.0, 3.0 - 0.5 - 0.5, -1.0 - 0.25 - 0.5, 0.5, 0.0]
    # repetition first (positive halved, negative doubled), then presence / frequency
    assert out[1].tolist() == [1.0, 2.0, 1.5 - 0.5 - 0.5, -2.0 - 0.25 - 0.5, 0.25, 0.0]


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    logits = torch.zeros(1, 10)
    logits[0, 0], logits[0, 5], logits[0, 7] = 9.0, 8.0, 1.0  # 0 is EOS, 5 a stop id, 7 the best other token
    held = {"min_tokens": 3, "max_tokens": 8, "stop_token_ids": (5,), "temperature": 0}
    assert sample(logits, [row(output=[4], **held)]).token_ids == [7]
    assert sample(logits, [row(output=[4], ignore_eos=True, **held)]).token_ids == [0]  # stop ids stay masked
    assert sample(logits, [row(output=[4, 4, 4], **held)]).token_ids == [0]  # min_tokens reached
    sampled = sample(logits.expand(200, 10), [row(output=[4], seed=i, **{**held, "temperature": 1.0})
                                              for i in range(200)]).token_ids
    assert not {0, 5} & set(sampled)
    # an id past the vocabulary can never be sampled: nothing to mask, and no crash
    assert sample(logits, [row(output=[], **{**held, "stop_token_ids": (5, 10_000)})]).token_ids == [7]


CUTS = [dict(top_k=50), dict(top_p=0.9), dict(top_k=50, top_p=0.8), dict(min_p=0.1), dict(top_k=400, top_p=0.95),
        dict(top_k=40, top_p=0.7, min_p=0.2), dict(top_k=1), dict(top_p=0.3, min_p=0.5)]


@pytest.mark.parametrize("cut", CUTS)
@pytest.mark.parametrize("scale", [4.0, 0.5])  # peaked: nucleus among the candidates; flat: needs the full sort
def test_top_k_top_p_min_p_keep_what_transformers_keeps(cut, scale):
    from transformers.generation.logits_process import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    temperature = 0.7
    logits = torch.randn(3, V) * scale
    x = logits / temperature
    ref = x.clone()
    if cut.get("top_k"):
        ref = TopKLogitsWarper(cut["top_k"])(None, ref)
    if cut.get("top_p"):
        ref = TopPLogitsWarper(cut["top_p"])(None, ref)
    if cut.get("min_p"):
        ref = MinPLogitsWarper(cut["min_p"])(None, ref)
    params = SamplingParams(temperature=temperature, **cut)
    k = torch.tensor([params.top_k or V] * 3)
    _, _, cutoff = truncation.cutoffs(x.clone(), k, torch.full((3,), params.top_p))
    min_p = torch.full((3, 1), params.min_p) if params.min_p else None
    kept = sampler._probs(x, cutoff, min_p) > 0
    assert torch.equal(kept, ref.isfinite())
    # and the sampler draws only from that set, whichever path each row takes
    draws = sample(logits.repeat(100, 1), [row(temperature=temperature, **cut) for _ in range(300)]).token_ids
    for i, token in enumerate(draws):
        assert ref[i % 3, token].isfinite()


@pytest.mark.parametrize("top_k", [0, 5])
def test_a_top_p_too_small_to_hold_any_mass_keeps_the_top_token(top_k):
    """top_p=1e-40 (a float32 denormal) or 5e-324 (0 in float32) kept no token and crashed the step, failing every
    request in the batch (found by the server's schema fuzzer); now the most likely token is kept, as HF's top-p."""
    logits = torch.randn(4, V)
    rows = [row(top_p=p, top_k=top_k, temperature=1.0) for p in (1e-40, 5e-324, 1e-30, 1e-45)]
    assert sample(logits, rows).token_ids == logits.argmax(-1).tolist()


def test_seeded_rows_are_the_same_alone_or_in_any_batch():
    torch.manual_seed(1)
    seeded = [(11, dict(temperature=1.0), 0.5), (12, dict(temperature=0.7, top_p=0.9), 4.0),
              (13, dict(temperature=1.0, top_k=20, min_p=0.05), 1.0), (14, dict(temperature=0.9, top_p=0.95), 0.3),
              (15, dict(temperature=1.2, repetition_penalty=1.5, presence_penalty=0.5), 1.0)]
    steps = 4
    logits = {seed: torch.randn(steps, V) * scale for seed, _, scale in seeded}

    def alone(seed, params):
        r = row(prompt=[3, 4], seed=seed, **params)
        out = []
        for step in range(steps):
            out += sample(logits[seed][step : step + 1], [r]).token_ids
            r.output_token_ids.append(out[-1])
        return out

    expected = {seed: alone(seed, params) for seed, params, _ in seeded}
    assert len(set(map(tuple, expected.values()))) == len(seeded)
    fillers = [dict(temperature=0), dict(temperature=1.0), dict(temperature=0.5, top_p=0.5, frequency_penalty=1.0),
               dict(temperature=1.0, top_k=300, logprobs=2, seed=99)]
    for order, n_fill in [((0, 1, 2, 3, 4), 0), ((4, 2, 0, 3, 1), 3), ((1, 3, 0, 4, 2), 8)]:
        batch = [row(prompt=[3, 4], seed=seeded[j][0], **seeded[j][1]) for j in order]
        batch += [row(**fillers[f % len(fillers)]) for f in range(n_fill)]
        batch = batch[::2] + batch[1::2]  # spread the seeded rows over the positions
        where = {r.params.seed: i for i, r in enumerate(batch) if r.params.seed in expected}
        got = {seed: [] for seed in expected}
        for step in range(steps):
            step_logits = torch.randn(len(batch), V)
            for seed, i in where.items():
                step_logits[i] = logits[seed][step]
            tokens = sample(step_logits, batch).token_ids
            for seed, i in where.items():
                got[seed].append(tokens[i])
            for r, t in zip(batch, tokens, strict=True):
                r.output_token_ids.append(t)
        assert got == expected


def test_different_seeds_differ_and_same_seed_repeats():
    logits = torch.zeros(1, V)  # uniform: any two seeds agreeing would be a 1 / V coincidence
    tokens = [sample(logits, [row(seed=s)]).token_ids[0] for s in range(20)]
    assert len(set(tokens)) >= 18
    assert tokens == [sample(logits, [row(seed=s)]).token_ids[0] for s in range(20)]


@pytest.mark.parametrize("seeded", [False, True])
def test_draws_follow_softmax_of_logits_over_temperature(seeded):
    torch.manual_seed(0)
    n = 20_000 if not seeded else 4_000
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0, 1.5])
    rows = [row(temperature=0.7, seed=i if seeded else None) for i in range(n)]
    counts = torch.bincount(torch.tensor(sample(logits.expand(n, 8), rows).token_ids), minlength=8).float()
    assert chi_square(counts, torch.softmax(logits / 0.7, -1)) < 24.3  # chi2(7 dof) at p = 0.001


@pytest.mark.parametrize("cut", [dict(), dict(top_k=5)])
def test_draws_follow_the_distribution_on_a_wide_vocabulary(cut):
    # over the whole vocabulary (no cut) and among the candidates (top-k): same law, renormalised
    torch.manual_seed(0)
    logits = torch.randn(V) * 0.5
    logits[:5] = torch.tensor([5.0, 4.5, 4.0, 3.5, 3.0])
    n = 6_000
    order = logits.argsort(descending=True)  # the five boosted tokens first
    tokens = sample(logits.expand(n, V), [row(**cut) for _ in range(n)]).token_ids
    counts = torch.bincount(torch.tensor(tokens), minlength=V).float()[order]
    probs = torch.softmax(logits, -1)[order]
    if cut:
        assert counts[5:].sum() == 0
        counts, probs = counts[:5], probs[:5] / probs[:5].sum()
        assert chi_square(counts, probs) < 18.5  # chi2(4 dof) at p = 0.001
    else:  # pool the tail so every cell expects plenty of draws
        counts = torch.cat([counts[:5], counts[5:].sum()[None]])
        probs = torch.cat([probs[:5], probs[5:].sum()[None]])
        assert chi_square(counts, probs) < 20.5  # chi2(5 dof) at p = 0.001


def test_logprobs_come_from_the_raw_logits():
    logits = torch.randn(5, V) * 2
    rows = [row(temperature=0.5, logprobs=3, repetition_penalty=1.5, output=[7]),
            row(temperature=0, logprobs=0, presence_penalty=1.0, output=[1, 2]),
            row(temperature=1.0, top_k=10),
            row(temperature=1.3, top_p=0.8, logprobs=5, seed=3),
            row(temperature=0, logprobs=20)]
    result = sample(logits, rows)
    lp = torch.log_softmax(logits, -1)
    for i, t in enumerate(result.token_ids):
        assert result.logprobs[i] == lp[i, t].item()
    assert [len(top) for top in result.top_logprobs] == [3, 0, 0, 5, 20]
    for i, top in enumerate(result.top_logprobs):
        values, ids = lp[i].topk(len(top)) if top else (torch.empty(0), torch.empty(0))
        assert [t for t, _ in top] == ids.tolist()
        assert [v for _, v in top] == values.tolist()
        assert all(a >= b for (_, a), (_, b) in zip(top, top[1:], strict=False))


def test_mixed_batch_gives_each_row_what_it_would_alone():
    logits = torch.randn(6, V) * 3
    rows = [dict(temperature=0), dict(temperature=0, repetition_penalty=2.0, frequency_penalty=1.0),
            dict(temperature=0.8, top_p=0.9, seed=5), dict(temperature=1.0, seed=6, presence_penalty=1.5),
            dict(temperature=0, min_tokens=3, max_tokens=4, stop_token_ids=(3,)), dict(temperature=1.0, top_k=3)]
    output = [int(logits[1].argmax()), int(logits[1].argmax())]
    logits[4, 0] = logits[4, 3] = 50.0  # EOS and a stop id would win but for min_tokens

    def make(i):
        return row(output=output, **rows[i])

    together = sample(logits, [make(i) for i in range(6)]).token_ids
    alone = [sample(logits[i : i + 1], [make(i)]).token_ids[0] for i in range(6)]
    assert together[:5] == alone[:5]
    assert together[1] != int(logits[1].argmax())  # the penalties moved it
    assert together[4] not in (0, 3)
    assert together[5] in logits[5].topk(3).indices.tolist()  # unseeded: only its support is fixed
