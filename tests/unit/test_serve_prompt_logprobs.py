"""Over HTTP on a tiny random model: echo + logprobs (OpenAI's legacy shape, as lm-evaluation-harness reads it),
max_tokens 0, vLLM's prompt_logprobs field on completions and chat, and logit_bias / allowed_token_ids / bad_words;
each bad value is a 400 naming its field."""

import asyncio
import itertools

import pytest

from lmforge.engine.logits_processors import resolve_constraints
from lmforge.engine.sampling_params import SamplingParams
from lmforge.serve.openai_api import create_app
from tests.unit.test_serve_api import assert_error
from tests.unit.tiny_server import VOCAB, chat, events, request, run, tiny_engine

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
PROMPT = [5, 17, 40, 99, 12, 8]
IDS = itertools.count()


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    eng = tiny_engine(tmp_path_factory.mktemp("tiny_plp_http"))
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def app(engine):
    return create_app(engine, ["tiny"], model_root="/models/tiny")


def post(app, route, body):
    response = run(request(app, "POST", route, body))
    assert response.status_code == 200, response.text
    return response.json()


def offline(engine, prompt, **fields):
    """The engine's own RequestOutput for the same request (the HTTP layer only reshapes it)."""

    async def main():
        return [out async for out in engine.generate(prompt, SamplingParams(**fields), f"check-{next(IDS)}")][-1]

    return asyncio.run(main())


def occurs(seq: tuple[int, ...], ids: list[int]) -> bool:
    return any(tuple(ids[i:i + len(seq)]) == seq for i in range(len(ids) - len(seq) + 1))


def test_echo_with_logprobs_is_openais_legacy_shape(app, engine):
    body = post(app, COMPLETIONS, {"prompt": [PROMPT, PROMPT[:3]], "echo": True, "logprobs": 2, "max_tokens": 3,
                                   "temperature": 0, "ignore_eos": True})
    want = offline(engine, PROMPT, temperature=0, max_tokens=3, ignore_eos=True, logprobs=2, prompt_logprobs=2)
    for choice, prompt in zip(body["choices"], [PROMPT, PROMPT[:3]], strict=True):
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(prompt) + 3
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert all(isinstance(x, float) for x in lp["token_logprobs"][1:])
        assert all(2 <= len(top) <= 3 for top in lp["top_logprobs"][1:])  # the top 2 and the actual token
        assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(lp["tokens"]))]
        assert choice["text"].startswith(engine.tokenizer.decode(prompt, False)) and "prompt_logprobs" not in choice
    first = body["choices"][0]["logprobs"]["token_logprobs"]
    expected = [e[t].logprob for e, t in zip(want.prompt_logprobs[1:], PROMPT[1:], strict=True)]
    assert first[1:len(PROMPT)] == pytest.approx(expected, abs=1e-6)
    assert body["usage"]["completion_tokens"] == 6


def test_max_tokens_zero_scores_the_prompt_alone_as_lm_eval_asks(app):
    fields = {"prompt": PROMPT, "echo": True, "logprobs": 1, "max_tokens": 0, "temperature": 0}
    body = post(app, COMPLETIONS, fields)
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length" and len(choice["logprobs"]["tokens"]) == len(PROMPT)
    assert body["usage"]["completion_tokens"] == 0 and body["usage"]["prompt_tokens"] == len(PROMPT)
    one = post(app, COMPLETIONS, {**fields, "max_tokens": 1})["choices"][0]  # what lm-eval 0.4.x sends
    assert one["logprobs"]["token_logprobs"][:len(PROMPT)] == choice["logprobs"]["token_logprobs"]
    assert one["text"].startswith(choice["text"]) and len(one["logprobs"]["tokens"]) == len(PROMPT) + 1
    streamed = events(run(request(app, "POST", COMPLETIONS, {**fields, "stream": True})))
    assert streamed[0]["choices"][0]["text"] == choice["text"]
    assert streamed[0]["choices"][0]["logprobs"] == choice["logprobs"]
    assert streamed[-2]["choices"][0]["finish_reason"] == "length" and streamed[-1] == "[DONE]"


def test_streamed_echo_logprobs_equal_whole_ones(app):
    fields = {"prompt": PROMPT, "echo": True, "logprobs": 1, "max_tokens": 5, "temperature": 0, "ignore_eos": True,
              "n": 2}
    whole = post(app, COMPLETIONS, fields)["choices"]
    streamed = events(run(request(app, "POST", COMPLETIONS, {**fields, "stream": True})))
    for choice in whole:
        parts = [c for e in streamed[:-1] for c in e["choices"] if c["index"] == choice["index"]]
        assert "".join(c["text"] for c in parts) == choice["text"]
        lps = [c["logprobs"] for c in parts if c.get("logprobs")]
        for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            assert [x for lp in lps for x in lp[key]] == choice["logprobs"][key]


def test_vllm_prompt_logprobs_field_on_completions_and_chat(app, engine):
    body = post(app, COMPLETIONS, {"prompt": PROMPT, "prompt_logprobs": 2, "max_tokens": 2, "temperature": 0})
    scored = body["choices"][0]["prompt_logprobs"]
    want = offline(engine, PROMPT, temperature=0, max_tokens=2, prompt_logprobs=2)
    assert scored[0] is None and len(scored) == len(PROMPT)
    for entry, expected, token in zip(scored[1:], want.prompt_logprobs[1:], PROMPT[1:], strict=True):
        assert list(entry) == [str(t) for t in expected]  # JSON keys: token ids, the actual token first
        assert entry[str(token)]["logprob"] == pytest.approx(expected[token].logprob, abs=1e-6)
        assert entry[str(token)]["rank"] == expected[token].rank and "decoded_token" in entry[str(token)]
    answer = post(app, CHAT, chat(prompt_logprobs=0, max_tokens=2))
    assert answer["prompt_logprobs"][0] is None and all(len(e) == 1 for e in answer["prompt_logprobs"][1:])
    assert answer["usage"]["prompt_tokens"] == len(answer["prompt_logprobs"])
    assert "prompt_logprobs" not in post(app, CHAT, chat(max_tokens=2))


def test_logit_bias_allowed_token_ids_and_bad_words(app, engine):
    base = {"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "ignore_eos": True, "logprobs": 0}
    decode = lambda ids: [engine.tokenizer.decode([t], False) for t in ids]  # noqa: E731
    biased = post(app, COMPLETIONS, {**base, "logit_bias": {"7": 100}})["choices"][0]
    assert biased["logprobs"]["tokens"] == decode([7] * 6)
    allowed = post(app, COMPLETIONS, {**base, "allowed_token_ids": [300, 301], "temperature": 1.0, "seed": 1})
    assert set(allowed["choices"][0]["logprobs"]["tokens"]) <= set(decode([300, 301]))
    plain = offline(engine, PROMPT, temperature=0, max_tokens=6, ignore_eos=True).outputs[0].token_ids
    # a word the greedy output contains, as vLLM tokenises bad words (bare and after a space)
    words = [w for t in plain if (w := engine.tokenizer.decode([t]).strip())
             and any(occurs(seq, plain) for seq in resolve_constraints(SamplingParams(bad_words=[w]), engine.tokenizer,
                                                                      VOCAB).bad_words_token_ids)][:1]
    assert words, "the greedy output has no word to ban"
    banned = post(app, COMPLETIONS, {**base, "bad_words": words})["choices"][0]
    want = offline(engine, PROMPT, temperature=0, max_tokens=6, ignore_eos=True, bad_words=words).outputs[0]
    assert banned["logprobs"]["tokens"] == decode(want.token_ids) and want.token_ids != plain
    assert not any(occurs(seq, want.token_ids) for seq in resolve_constraints(
        SamplingParams(bad_words=words), engine.tokenizer, VOCAB).bad_words_token_ids)
    chat_biased = post(app, CHAT, chat(max_tokens=3, temperature=0, logit_bias={"9": 100}, logprobs=True))
    assert [t["token"] for t in chat_biased["choices"][0]["logprobs"]["content"]] == decode([9] * 3)


# (route, body, param, words): each refused with a 400 naming the field
BAD = [
    (CHAT, chat(logit_bias={"5": 101}), "logit_bias", "[-100, 100]"),
    (CHAT, chat(logit_bias={"5": -100.5}), "logit_bias", "[-100, 100]"),
    (CHAT, chat(logit_bias={"five": 1}), "logit_bias", "not a token id"),
    (CHAT, chat(logit_bias={"1.5": 1}), "logit_bias", "not a token id"),
    (CHAT, chat(logit_bias={str(VOCAB): 1}), "logit_bias", "outside the vocabulary"),
    (COMPLETIONS, {"prompt": "x", "logit_bias": {"5": "x"}}, "logit_bias.5", "valid number"),
    (COMPLETIONS, {"prompt": "x", "logit_bias": [5]}, "logit_bias", "valid dictionary"),
    (CHAT, chat(allowed_token_ids=[]), "allowed_token_ids", "must not be empty"),
    (CHAT, chat(allowed_token_ids=[1, VOCAB + 3]), "allowed_token_ids", "outside the vocabulary"),
    (COMPLETIONS, {"prompt": "x", "allowed_token_ids": [-1]}, "allowed_token_ids", "token ids"),
    (COMPLETIONS, {"prompt": "x", "bad_words": [" "]}, "bad_words", "non-blank"),
    (COMPLETIONS, {"prompt": "x", "bad_words": "word"}, "bad_words", "valid list"),
    (COMPLETIONS, {"prompt": "x", "prompt_logprobs": 1, "stream": True}, "prompt_logprobs", "stream"),
    (CHAT, chat(prompt_logprobs=21), "prompt_logprobs", "less than or equal to 20"),
    (CHAT, chat(prompt_logprobs=-1), "prompt_logprobs", "greater than or equal to 0"),
    (COMPLETIONS, {"prompt": "x", "max_tokens": 0}, "max_tokens", "only allowed with echo"),
    (COMPLETIONS, {"prompt": "x", "max_tokens": -1, "echo": True}, "max_tokens", "greater than or equal to 0"),
    (CHAT, chat(max_tokens=0), "max_tokens", "greater than or equal to 1"),
]


@pytest.mark.parametrize(("route", "body", "param", "words"), BAD,
                         ids=[f"{i}-{p}" for i, (_, _, p, _) in enumerate(BAD)])
def test_bad_values_are_a_400_naming_the_field(app, route, body, param, words):
    assert_error(run(request(app, "POST", route, body)), 400, param, words)
