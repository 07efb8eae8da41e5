"""logprobs_mode="processed_logprobs": each sampled token's log-prob under the distribution it was drawn from
(temperature, top-k, top-p, min-p, penalties applied), checked against transformers' own logits warpers; and the
trainer's `processed_log_probs`, which must give the same numbers from its own logits, with the right gradient."""

import pytest
import torch

from lmforge import LLM, SamplingParams
from lmforge.engine.config import EngineConfig
from lmforge.engine.sampler import SamplingRow, sample
from lmforge.engine.truncation import CANDIDATES, cutoffs, dropped, processed_log_probs
from lmforge.layers.attention import AttnMeta
from tests.tiny import TINY_LLAMA, tiny_model

V = 4 * CANDIDATES  # wider than the candidate set: both the candidate and the full-sort paths run
CUTS = [dict(), dict(top_k=50), dict(top_p=0.9), dict(min_p=0.1), dict(top_k=40, top_p=0.8),
        dict(top_k=400, top_p=0.95, min_p=0.05), dict(top_p=0.7, min_p=0.2), dict(top_k=1)]


def row(output=(), seed=None, **params) -> SamplingRow:
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    return SamplingRow(SamplingParams(seed=seed, **params), gen, [1, 2], list(output), frozenset({0}))


def hf_processed(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                 prompt: list[int] | None = None, repetition_penalty: float = 1.0) -> torch.Tensor:
    """The reference: transformers' processors and warpers in HF's order, then log_softmax ([N, V], differentiable)."""
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    x = logits
    if repetition_penalty != 1:
        x = RepetitionPenaltyLogitsProcessor(repetition_penalty)(torch.tensor([prompt] * len(x)), x)
    if temperature >= 1e-5:
        x = TemperatureLogitsWarper(temperature)(None, x)
        if top_k:
            x = TopKLogitsWarper(top_k)(None, x)
        if top_p < 1:
            x = TopPLogitsWarper(top_p)(None, x)
        if min_p:
            x = MinPLogitsWarper(min_p)(None, x)
    return torch.log_softmax(x, -1)


@pytest.mark.parametrize("temperature", [0.7, 1.3])
@pytest.mark.parametrize("cut", CUTS)
@pytest.mark.parametrize("scale", [4.0, 0.5])  # peaked: nucleus among the candidates; flat: the full sort
def test_engine_and_trainer_log_probs_equal_transformers_warpers(temperature, cut, scale):
    torch.manual_seed(0)
    logits = torch.randn(6, V) * scale
    ref = hf_processed(logits, temperature, **cut)
    rows = [row(seed=i, temperature=temperature, logprobs=5, **cut) for i in range(6)]
    result = sample(logits, rows, logprobs_mode="processed_logprobs")
    tokens = torch.tensor(result.token_ids)
    expected = ref.gather(1, tokens[:, None])[:, 0]
    assert expected.isfinite().all()  # the sampled token was kept
    torch.testing.assert_close(torch.tensor(result.logprobs), expected, atol=1e-6, rtol=0)
    for i, top in enumerate(result.top_logprobs):  # the 5 best of the processed distribution, -inf past its end
        ids, vals = torch.tensor([t for t, _ in top]), torch.tensor([v for _, v in top])
        torch.testing.assert_close(vals, ref[i].topk(5).values, atol=1e-6, rtol=0)
        kept = vals.isfinite()
        torch.testing.assert_close(ref[i, ids[kept]], vals[kept], atol=1e-6, rtol=0)
    # the trainer's function: the sampled tokens, a few more kept ones and some dropped ones, from the same logits
    more = torch.cat([tokens[:, None], ref.topk(3).indices, torch.randint(0, V, (6, 4))], 1)
    n = more.shape[1]
    mine = processed_log_probs(logits.repeat_interleave(n, 0), more.flatten(), temperature, **cut)
    torch.testing.assert_close(mine, ref.gather(1, more).flatten(), atol=1e-6, rtol=0)
    assert torch.equal(mine.view(6, n)[:, 0], torch.tensor(result.logprobs))  # the engine's, bit for bit


@pytest.mark.parametrize("cut", [dict(top_p=0.9), dict(top_k=30, min_p=0.1), dict(top_k=500, top_p=0.97)])
def test_trainer_gradient_matches_autograd_of_the_reference(cut):
    torch.manual_seed(1)
    logits = (torch.randn(5, V) * 2).requires_grad_()
    tokens = hf_processed(logits.detach(), 0.8, **cut).argmax(-1)  # kept tokens: finite log-probs
    tokens[1] = hf_processed(logits.detach()[1:2], 0.8, **cut)[0].topk(2).indices[1]
    weights = torch.randn(5)
    mine = processed_log_probs(logits, tokens, 0.8, **cut)
    (grad,) = torch.autograd.grad((mine * weights).sum(), logits)
    ref = hf_processed(logits, 0.8, **cut).gather(1, tokens[:, None])[:, 0]
    (ref_grad,) = torch.autograd.grad((ref * weights).sum(), logits)
    torch.testing.assert_close(mine, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=0)
    assert (grad != 0).sum(-1).max() < V  # dropped tokens get no gradient


def test_greedy_rows_report_the_penalised_logits_without_temperature_or_cuts():
    """vLLM's choice for greedy rows in processed mode: log_softmax of the logits after penalties, nothing else (its
    greedy rows skip the temperature, and its SamplingParams turn top-k/p and min-p off at temperature 0)."""
    torch.manual_seed(2)
    logits = torch.randn(4, V) * 2
    prompt = [3, 5, 5, 7]
    rows = [SamplingRow(SamplingParams(temperature=t, top_p=0.8, repetition_penalty=1.4, logprobs=2, seed=9), g,
                        prompt, [], frozenset({0}))
            for t, g in ((0, None), (0.9, torch.Generator().manual_seed(1)), (0, None),
                         (0.9, torch.Generator().manual_seed(2)))]
    result = sample(logits, rows, logprobs_mode="processed_logprobs")
    tokens = torch.tensor(result.token_ids)
    for i, t in enumerate((0, 0.9, 0, 0.9)):
        ref = hf_processed(logits[i:i + 1], t, top_p=0.8 if t else 1.0, prompt=prompt, repetition_penalty=1.4)[0]
        torch.testing.assert_close(result.logprobs[i], ref[tokens[i]].item(), atol=1e-6, rtol=0)
        torch.testing.assert_close(torch.tensor([v for _, v in result.top_logprobs[i]]), ref.topk(2).values,
                                   atol=1e-6, rtol=0)
    greedy = hf_processed(logits[[0, 2]], 0, prompt=prompt, repetition_penalty=1.4).argmax(-1)
    assert tokens[[0, 2]].tolist() == greedy.tolist()


def test_sampled_tokens_always_have_finite_processed_log_probs_and_raw_mode_is_unchanged():
    torch.manual_seed(3)
    logits = torch.randn(8, V) * 3
    for draw in range(25):
        rows = [row(seed=100 * draw + i, temperature=(0.5, 1.0, 1.7, 0)[i % 4], logprobs=1, **CUTS[i])
                for i in range(8)]
        processed = sample(logits, rows, logprobs_mode="processed_logprobs")
        assert all(lp > float("-inf") for lp in processed.logprobs)
    # the mode changes what is reported, never what is drawn; raw mode reports log_softmax(logits) bit for bit
    fresh = [row(seed=7 + i, temperature=1.0, top_p=0.9, logprobs=3) for i in range(8)]
    raw = sample(logits, fresh)
    again = [row(seed=7 + i, temperature=1.0, top_p=0.9, logprobs=3) for i in range(8)]
    processed = sample(logits, again, logprobs_mode="processed_logprobs")
    assert raw.token_ids == processed.token_ids
    lp = torch.log_softmax(logits, -1)
    assert raw.logprobs == lp.gather(1, torch.tensor(raw.token_ids)[:, None])[:, 0].tolist()
    vals, ids = lp.topk(3)
    assert raw.top_logprobs == [list(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), vals.tolist(), strict=True)]
    assert all(p < r for p, r in zip(raw.logprobs, processed.logprobs, strict=True))  # mass of the cut tail added


def test_logits_modes_report_the_logits_themselves():
    torch.manual_seed(4)
    logits = torch.randn(3, V)
    def rows():
        return [row(seed=i, temperature=0.6, top_k=20, logprobs=2) for i in range(3)]

    raw = sample(logits, rows(), logprobs_mode="raw_logits")
    assert raw.logprobs == logits.gather(1, torch.tensor(raw.token_ids)[:, None])[:, 0].tolist()
    processed = sample(logits, rows(), logprobs_mode="processed_logits")
    assert processed.token_ids == raw.token_ids
    kept = (logits / 0.6).masked_fill(logits < logits.topk(20).values[:, -1:], float("-inf"))
    assert processed.logprobs == kept.gather(1, torch.tensor(raw.token_ids)[:, None])[:, 0].tolist()


def test_ties_at_the_top_p_boundary_are_all_kept():
    """HF's TopPLogitsWarper walks its sorted order one token at a time and keeps only some of three tied logits;
    the sampler keeps a logit equal to the cut-off whichever id it has (the same rule as HF's top-k)."""
    from transformers.generation.logits_process import TopPLogitsWarper

    x = torch.tensor([[3.0, 1.0, 1.0, 1.0, 0.0, -1.0]])  # probabilities 0.68, 3 x 0.09, 0.03, 0.01
    cut = cutoffs(x, torch.tensor([6]), torch.tensor([0.8]))[2]
    assert dropped(x, cut, None).tolist() == [[False, False, False, False, True, True]]
    assert TopPLogitsWarper(0.8)(None, x.clone()).isfinite().sum() < 4  # HF: 3 (today), of the same 4
    lp = processed_log_probs(x.expand(6, 6), torch.arange(6), 1.0, top_p=0.8)
    assert lp[1] == lp[2] == lp[3] > float("-inf") and lp[4:].isinf().all()


def test_bad_settings_are_one_clear_error():
    with pytest.raises(ValueError, match="logprobs_mode must be one of raw_logprobs, raw_logits, processed_logprobs, "
                                         "processed_logits, got 'processed'"):
        EngineConfig(logprobs_mode="processed")
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\], got 1.5"):
        processed_log_probs(torch.zeros(2, 5), torch.zeros(2, dtype=torch.long), 1.0, top_p=1.5)
    with pytest.raises(ValueError, match=r"logits \(2, 5\) and tokens \(3,\)"):
        processed_log_probs(torch.zeros(2, 5), torch.zeros(3, dtype=torch.long), 1.0)


def test_cli_flag(capsys):
    import argparse

    from lmforge.cli import main
    from lmforge.cli.engine_args import add_engine_args, engine_config

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    args = parser.parse_args(["--logprobs-mode", "processed_logprobs"])
    assert engine_config(args).logprobs_mode == "processed_logprobs"
    assert engine_config(parser.parse_args([])).logprobs_mode == "raw_logprobs"
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--logprobs-mode", "processed", "--port", "1"])
    assert exit_info.value.code == 2
    assert "argument --logprobs-mode: invalid choice: 'processed'" in capsys.readouterr().err


def test_generate_returns_the_log_probs_of_the_trainers_processed_distribution(tmp_path):
    """A live tiny model through LLM.generate (temperature 0.8, top_p 0.9): each sampled token's log-prob is
    processed_log_probs of the model's own float32 logits at that position, as a GRPO trainer recomputes it."""
    from lmforge.tokenizer import Tokenizer
    from tests.tokenizer_refs import llama_style_dir

    model = tiny_model({**TINY_LLAMA, "vocab_size": 550})  # the test tokenizer's vocabulary: > CANDIDATES
    tokenizer = Tokenizer.from_dir(llama_style_dir(tmp_path))
    llm = LLM(model=model, tokenizer=tokenizer, kv_cache_memory=0.004, block_size=4, max_model_len=64,
              logprobs_mode="processed_logprobs")
    prompts = [[1 + (7 * i + 3 * j) % 500 for j in range(3 + 4 * i)] for i in range(4)]
    params = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=12, ignore_eos=True, logprobs=0, seed=5)
    reported, raw = [], []
    for prompt, out in zip(prompts, llm.generate(prompts, params, use_tqdm=False), strict=True):
        tokens = list(out.outputs[0].token_ids)
        engine_lp = torch.tensor([d[t].logprob for d, t in zip(out.outputs[0].logprobs, tokens, strict=True)])
        ids = torch.tensor(prompt + tokens)
        with torch.no_grad():
            logits = model.logits(model(ids, torch.arange(len(ids)), AttnMeta.for_sequences([len(ids)]))).float()
        rows = torch.arange(len(prompt) - 1, len(ids) - 1)
        expected = processed_log_probs(logits[rows], ids[rows + 1], 0.8, top_p=0.9)
        torch.testing.assert_close(engine_lp, expected, atol=1e-5, rtol=0)
        reported.append(engine_lp)
        raw.append(torch.log_softmax(logits[rows], -1).gather(1, ids[rows + 1][:, None])[:, 0])
    assert (torch.cat(reported) - torch.cat(raw)).abs().min() > 0.01  # not the raw log-probs


def test_server_sends_processed_log_probs_and_dropped_alternatives_as_the_floor(tmp_path):
    """Over HTTP with --logprobs-mode processed_logprobs: top_k 1 keeps one token, so the sampled token's log-prob
    is 0 and the other alternatives asked for are -inf, sent as vLLM's -9999.0 (JSON has no infinity)."""
    from lmforge.engine.async_engine import AsyncEngine
    from lmforge.serve.openai_api import create_app
    from tests.unit.tiny_server import chat, request, run, tiny_chat_model

    path = tiny_chat_model(tmp_path)
    engine = AsyncEngine(model=str(path), dtype="float32", kv_cache_memory=0.002, block_size=4,
                         logprobs_mode="processed_logprobs")
    try:
        app = create_app(engine, ["tiny"], model_root=str(path))
        body = chat(max_tokens=4, ignore_eos=True, temperature=0.9, top_k=1, logprobs=True, top_logprobs=3)
        response = run(request(app, "POST", "/v1/chat/completions", body))
    finally:
        engine.shutdown()
    assert response.status_code == 200, response.text
    content = response.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 4
    for entry in content:
        assert entry["logprob"] == 0.0
        assert [t["logprob"] for t in entry["top_logprobs"]] == [0.0, -9999.0, -9999.0]
