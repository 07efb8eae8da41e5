"""Speculative decoding (n-gram prompt lookup) on tiny random models: the config, proposals, verification, and
the engine giving exactly the output of plain decoding (greedy) or the target distribution (sampled)."""

import json

import pytest
import torch

from lmforge import LLM, SamplingParams
from lmforge.cli import build_parser, main
from lmforge.cli.engine_args import engine_config
from lmforge.engine.config import EngineConfig
from lmforge.engine.speculative import SpeculativeConfig, propose_ngram, verify
from tests.unit.tiny_server import tiny_chat_model

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
SELF_DRAFT = {"model": "self", "num_speculative_tokens": 3, "num_draft_layers": 1}  # 1 of the tiny model's 2


# ---- config ------------------------------------------------------------------------------------------------
def test_config_defaults_as_vllm():
    assert SpeculativeConfig.from_dict({"num_speculative_tokens": 2}) == SpeculativeConfig(2, "ngram", 5, 5)
    assert SpeculativeConfig.from_dict({"num_speculative_tokens": 2, "prompt_lookup_max": 3}).prompt_lookup_min == 3
    assert SpeculativeConfig.from_dict({"num_speculative_tokens": 2, "prompt_lookup_min": 2}).prompt_lookup_max == 2
    config = EngineConfig(speculative_config=NGRAM)
    assert config.speculative_config == SpeculativeConfig(3, "ngram", 3, 1)


@pytest.mark.parametrize("bad, words", [
    ({"method": "ngram"}, "needs num_speculative_tokens"),
    ({"num_speculative_tokens": 0}, "num_speculative_tokens must be an integer >= 1, got 0"),
    ({"num_speculative_tokens": "3"}, "num_speculative_tokens must be an integer >= 1, got '3'"),
    ({"num_speculative_tokens": 2, "method": "eagle"}, "method must be one of ['ngram', 'draft_model'], got 'eagle'"),
    ({"num_speculative_tokens": 2, "model": "x"}, "model 'x': only 'self'"),
    ({"num_speculative_tokens": 2, "model": "self", "prompt_lookup_max": 2}, "prompt_lookup_max does not apply"),
    ({"num_speculative_tokens": 2, "num_draft_layers": 2}, "num_draft_layers does not apply to method 'ngram'"),
    ({"num_speculative_tokens": 2, "model": "self", "num_draft_layers": 0}, "num_draft_layers must be an integer"),
    ({"num_speculative_tokens": 2, "prompt_lookup_min": 0, "prompt_lookup_max": 3}, "prompt_lookup_min must be"),
    ({"num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 3}, "(4) must not exceed"),
    ({"num_speculative_tokens": 2, "lookahead": 3}, "unknown field 'lookahead'"),
    ([2], "must be a JSON object"),
])
def test_config_errors_name_the_field(bad, words):
    with pytest.raises(ValueError) as e:
        EngineConfig(speculative_config=bad)
    assert words in str(e.value)


@pytest.mark.parametrize("flag, words", [("{bad", "--speculative-config is not valid JSON"),
                                         ('{"num_speculative_tokens": -1}', "num_speculative_tokens must be")])
def test_cli_flag_errors_exit_2(flag, words, capsys):
    assert main(["generate", "hi", "--speculative-config", flag]) == 2
    assert words in capsys.readouterr().err


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_cli_flag_reaches_the_engine_config(command):
    args = build_parser().parse_args([command, "--speculative-config", json.dumps(NGRAM)])
    assert engine_config(args).speculative_config == SpeculativeConfig(3, "ngram", 3, 1)


# ---- proposals and verification ----------------------------------------------------------------------------
def test_ngram_proposal_takes_the_longest_suffix_then_the_earliest_match():
    #        0  1  2  3  4  5  6  7  8  9 10 11
    tokens = [1, 2, 3, 4, 9, 2, 3, 5, 7, 8, 2, 3]
    assert propose_ngram(tokens, 2, 3, 1) == [4, 9]  # "2 3" first occurs at 1 (n = 3: "8 2 3" never recurs)
    assert propose_ngram(tokens, 5, 3, 1) == [4, 9, 2, 3, 5]
    assert propose_ngram(tokens + [5], 2, 3, 1) == [7, 8]  # "2 3 5" at 5 beats the shorter "3 5"/"5"
    assert propose_ngram(tokens + [6], 2, 3, 1) == []  # 6 never occurred before
    assert propose_ngram(tokens, 2, 3, 3) == []  # min 3: "8 2 3" is all that counts
    assert propose_ngram([4, 4, 4], 3, 2, 1) == [4]  # the match must have a token after it, inside the context
    assert propose_ngram([7], 2, 2, 1) == []
    assert propose_ngram(tokens, 0, 3, 1) == []


def test_verify_keeps_the_matching_prefix_then_the_targets_token():
    assert verify([5, 6, 7], [5, 6, 7, 8]) == [5, 6, 7, 8]  # all accepted, plus the bonus token
    assert verify([5, 6, 7], [5, 9, 7, 8]) == [5, 9]  # rejected at 1: the target's own token there
    assert verify([5, 6, 7], [1, 6, 7, 8]) == [1]
    assert verify([], [4]) == [4]
    with pytest.raises(ValueError, match="expected one more"):
        verify([5, 6], [5, 6])


# ---- the engine ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(tiny_chat_model(tmp_path_factory.mktemp("tiny_spec")))


def engine(model_dir, spec: dict | None, **kw) -> LLM:
    return LLM(model_dir, dtype="float32", kv_cache_memory=0.004, block_size=4, speculative_config=spec, **kw)


def repetitive(i: int, length: int) -> list[int]:
    """Prompts that repeat themselves: the tiny model's greedy continuations often copy them, so drafts get
    accepted (several tokens at once) as well as rejected."""
    motif = [(i * 7 + j * 3) % 40 + 3 for j in range(5 + i % 4)]
    return (motif * (length // len(motif) + 1))[:length]


def random_prompt(i: int, length: int) -> list[int]:
    return torch.randint(3, 500, (length,), generator=torch.Generator().manual_seed(i)).tolist()


def record_steps(llm: LLM) -> list[tuple[bool, bool, bool]]:
    """Wraps the runner: per step, (a sequence scores a draft, a prefill chunk, a plain decode)."""
    steps, execute = [], llm.engine.runner.execute

    def spy(batch, lora=None):
        kinds = [bool(s.spec_token_ids) if s.num_computed_tokens == s.num_tokens - 1 else None for s in batch.seqs]
        steps.append((True in kinds, None in kinds, False in kinds))
        return execute(batch, lora)

    llm.engine.runner.execute = spy
    return steps


def assert_clean(llm: LLM) -> None:
    bm = llm.engine.block_manager
    assert not llm.engine.has_unfinished_requests()
    assert bm.num_free_blocks == bm.num_blocks and all(b.ref_count == 0 for b in bm.blocks)


@pytest.mark.parametrize("eager, spec", [(False, NGRAM), (True, NGRAM), (False, SELF_DRAFT)],
                         ids=["ngram-kernels", "ngram-eager", "self-draft"])
def test_greedy_mixed_batch_equals_plain_decoding(model_dir, eager, spec):
    """Speculating, non-speculating and prefilling sequences share steps (a small token budget chunks the long
    prompts, which arrive while the short ones decode); the tokens are those of plain decoding."""
    prompts = [repetitive(i, 12 + 3 * i) for i in range(6)] + [random_prompt(i, 70) for i in range(3)]
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    plain = engine(model_dir, None, enforce_eager=eager)
    expected = [o.outputs[0].token_ids for o in plain.generate(prompts, params, use_tqdm=False)]
    llm = engine(model_dir, spec, enforce_eager=eager, max_num_batched_tokens=40)
    steps = record_steps(llm)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert got == expected
    stats = llm.engine.spec_stats
    assert stats.num_drafts > 20 and 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    assert stats.accepted_per_pos[2] > 0  # whole drafts accepted: 4 tokens in a step
    # the self-draft drafts for every decoding sequence: no plain decodes beside it
    assert any(kinds[:2] == (True, True) and (kinds[2] or spec is SELF_DRAFT) for kinds in steps), \
        "no step mixed drafts, prefill chunks and plain decodes"
    assert_clean(llm)


@pytest.fixture(scope="module")
def greedy_pair(model_dir):
    return engine(model_dir, None), engine(model_dir, {**NGRAM, "num_speculative_tokens": 4})


def test_max_tokens_and_stops_mid_acceptance(greedy_pair):
    """Every max_tokens, every stop token and stop string cutting a long greedy run (most of them inside an
    accepted draft): the same tokens, text, finish and stop reasons, logprobs as plain decoding; nothing after
    a stop is emitted."""
    plain, spec = greedy_pair
    prompt = repetitive(1, 20)
    base = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    run = plain.generate([prompt], base, use_tqdm=False)[0].outputs[0]
    tokens, text = run.token_ids, run.text
    pieces = sorted({text[i:i + 2] for i in range(0, len(text) - 2, 3)} - {""})
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in range(1, 41)]
    params += [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop_token_ids=(t,), logprobs=2)
               for t in sorted(set(tokens))]
    params += [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=(s,), min_tokens=3) for s in pieces]
    params += [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop_token_ids=(t,), min_tokens=m)
               for t in sorted(set(tokens))[:4] for m in (2, 9)]
    want = plain.generate([prompt] * len(params), params, use_tqdm=False)
    before = spec.engine.spec_stats.num_accepted_tokens
    got = spec.generate([prompt] * len(params), params, use_tqdm=False)
    assert spec.engine.spec_stats.num_accepted_tokens - before > 100
    for p, w, g in zip(params, want, got, strict=True):
        w, g = w.outputs[0], g.outputs[0]
        assert (g.token_ids, g.text, g.finish_reason, g.stop_reason) == \
            (w.token_ids, w.text, w.finish_reason, w.stop_reason), p
        if p.logprobs:
            assert [{t: round(x.logprob, 4) for t, x in d.items()} for d in g.logprobs] == \
                [{t: round(x.logprob, 4) for t, x in d.items()} for d in w.logprobs]
    assert_clean(spec)


def test_preemption_and_abort_with_drafts(model_dir):
    """A pool too small for every sequence at once: drafts are dropped, sequences preempted and recomputed,
    one request aborted mid-way; the outputs are plain decoding's and every block comes back."""
    prompts = [repetitive(i, 24) for i in range(8)]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in engine(model_dir, None).generate(prompts, params, use_tqdm=False)]
    llm = LLM(model_dir, dtype="float32", kv_cache_memory=64 * 4 * 2 * 2 * 2 * 8 * 4 / 2**30, block_size=4,
              speculative_config=NGRAM)  # 64 blocks of 4 tokens: 4 sequences of 64 tokens
    eng = llm.engine
    for i, prompt in enumerate(prompts):
        eng.add_request(str(i), prompt, params)
    eng.add_request("doomed", prompts[0], params)
    outputs = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                outputs[out.request_id] = out.outputs[0].token_ids
        if eng.num_steps == 8:
            assert eng.abort("doomed") is not None
    assert eng.scheduler.num_preemptions > 0 and eng.spec_stats.num_accepted_tokens > 0
    assert [outputs[str(i)] for i in range(8)] == want and "doomed" not in outputs
    assert_clean(llm)


def test_self_draft_depth_is_checked_against_the_model(model_dir):
    with pytest.raises(ValueError, match=r"num_draft_layers must be in \[1, 1\] for this 2-layer model, got 2"):
        engine(model_dir, {**SELF_DRAFT, "num_draft_layers": 2})


# ---- the sampled distribution ------------------------------------------------------------------------------
def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's test of counts against probs; cells expected below 5 are pooled into one."""
    if (counts[probs == 0] > 0).any():
        return 0.0
    expected = probs * counts.sum()
    small = expected < 5
    obs = torch.cat([counts[~small], counts[small].sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = exp > 0
    stat = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat.double() / 2))


TOP_K, TEMPERATURE, PENALTY, TOKENS, SAMPLES = 4, 0.4, 1.1, 4, 4000


def exact_distribution(model_dir, prompt: list[int]) -> tuple[torch.Tensor, list[tuple[int, ...]]]:
    """p(t1, .., t4) over the top-k candidates, from Hugging Face's forward of the same checkpoint and its logits
    processors: the repetition penalty over prompt and output so far, temperature, top-k."""
    from transformers import AutoModelForCausalLM
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor, TopKLogitsWarper

    hf = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()

    @torch.no_grad()
    def dist(context):
        ids = torch.tensor([context])
        logits = RepetitionPenaltyLogitsProcessor(PENALTY)(ids, hf(ids).logits[:, -1])
        return torch.softmax(TopKLogitsWarper(TOP_K)(ids, logits / TEMPERATURE)[0], -1)

    joint, cells = [], []

    def walk(prefix: tuple[int, ...], prob: float) -> None:
        if len(prefix) == TOKENS:
            joint.append(prob)
            cells.append(prefix)
            return
        p = dist(prompt + list(prefix))
        for t in p.nonzero()[:, 0].tolist():
            walk((*prefix, t), prob * float(p[t]))

    walk((), 1.0)
    return torch.tensor([*joint, 0.0], dtype=torch.float64), cells  # 0: the cell of impossible outputs


def sampled_counts(model_dir, prompt, cells, wrong_verifier: bool = False, spec: dict | None = None
                   ) -> tuple[torch.Tensor, float]:
    import lmforge.engine.llm_engine as llm_engine

    spec = spec or {**NGRAM, "num_speculative_tokens": 2, "prompt_lookup_min": 1}
    llm = engine(model_dir, spec, max_num_seqs=512)
    if wrong_verifier:  # accepts every draft token: the output leans towards the draft
        llm_engine.verify, right = (lambda draft, sampled: [*draft, sampled[-1]]), llm_engine.verify
    try:
        params = [SamplingParams(temperature=TEMPERATURE, top_k=TOP_K, repetition_penalty=PENALTY, max_tokens=TOKENS,
                                 ignore_eos=True, seed=s)
                  for s in range(SAMPLES)]
        outs = llm.generate([prompt] * SAMPLES, params, use_tqdm=False)
    finally:
        if wrong_verifier:
            llm_engine.verify = right
    index = {c: i for i, c in enumerate(cells)}
    counts = torch.zeros(len(cells) + 1, dtype=torch.float64)  # the last cell: outputs the target never gives
    for o in outs:
        counts[index.get(tuple(o.outputs[0].token_ids), len(cells))] += 1
    return counts, llm.engine.spec_stats.acceptance_rate


@pytest.fixture(scope="module")
def target(model_dir):
    # the prompt is the model's own greedy continuation of a few tokens, so a sampled token has often occurred in
    # it, followed by tokens the model likes: the second step scores a draft of two tokens, often accepted
    start = random_prompt(2, 6)
    greedy = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
    prompt = start + engine(model_dir, None).generate([start], greedy, use_tqdm=False)[0].outputs[0].token_ids
    with torch.no_grad():
        joint, cells = exact_distribution(model_dir, prompt)
    return prompt, joint, cells


@pytest.mark.parametrize("spec", [None, {**SELF_DRAFT, "num_speculative_tokens": 2}], ids=["ngram", "self-draft"])
def test_sampled_tokens_follow_the_target_distribution(model_dir, target, spec):
    prompt, joint, cells = target
    counts, acceptance = sampled_counts(model_dir, prompt, cells, spec=spec)
    assert 0.1 < acceptance < 0.9  # both the accepting and the rejecting path carry weight
    assert chi_square_p_value(counts, joint) > 1e-4


def test_the_distribution_test_catches_a_wrong_verifier(model_dir, target):
    prompt, joint, cells = target
    counts, _ = sampled_counts(model_dir, prompt, cells, wrong_verifier=True)
    assert chi_square_p_value(counts, joint) < 1e-6


def test_server_metrics_count_drafts(model_dir):
    """/metrics exports vLLM's spec_decode counters, equal to the engine's own statistics."""
    from lmforge.engine.async_engine import AsyncEngine
    from lmforge.serve.openai_api import create_app
    from tests.unit.test_serve_metrics import scrape
    from tests.unit.tiny_server import request, run

    eng = AsyncEngine(model=model_dir, dtype="float32", kv_cache_memory=0.004, block_size=4, speculative_config=NGRAM)
    try:
        app = create_app(eng, ["tiny"])
        body = {"prompt": repetitive(3, 30), "max_tokens": 30, "temperature": 0, "ignore_eos": True}
        assert run(request(app, "POST", "/v1/completions", body)).status_code == 200
        samples = scrape(app)
        stats = eng.engine.spec_stats
        assert stats.num_accepted_tokens > 0
        assert samples["lmforge:spec_decode_num_drafts_total"] == stats.num_drafts
        assert samples["lmforge:spec_decode_num_draft_tokens_total"] == stats.num_draft_tokens
        assert samples["lmforge:spec_decode_num_accepted_tokens_total"] == stats.num_accepted_tokens
        per_pos = [samples[f"lmforge:spec_decode_num_accepted_tokens_per_pos_total{{position={i}}}"] for i in range(3)]
        assert per_pos == stats.accepted_per_pos and sum(per_pos) == stats.num_accepted_tokens
    finally:
        eng.shutdown()
