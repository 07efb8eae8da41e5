"""logit_bias, allowed_token_ids and bad_words (vLLM's semantics) inside the batched sampler: each does what it says,
touches only its own row, and leaves the log-probs those of the raw logits."""

import pytest
import torch

from lmforge.engine.logits_processors import bad_words_token_ids, resolve_constraints
from lmforge.engine.sampler import SamplingRow, sample
from lmforge.engine.sampling_params import SamplingParams

V = 600  # wider than the sampler's candidate set: both of its paths run


def row(output=(), seed=None, **params) -> SamplingRow:
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    params = SamplingParams(seed=seed, **params)
    if params.bad_words:  # what the engine does at add_request: one character per token
        params = resolve_constraints(params, CharTokenizer(), V)
    return SamplingRow(params, gen, [1, 2], list(output), frozenset({0}))


class CharTokenizer:
    """Token id = code point: words tokenise one character per token, so bad-word prefixes are easy to write."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) for c in text]


def test_logit_bias_moves_the_greedy_pick_and_adds_exactly():
    logits = torch.randn(2, V)
    top = int(logits[0].argmax())
    low = int(logits[0].argmin())
    result = sample(logits, [row(temperature=0, logit_bias={low: 100.0}), row(temperature=0, logit_bias={top: -100})])
    assert result.token_ids[0] == low
    second = logits[1].clone()
    second[top] -= 100
    assert result.token_ids[1] == int(second.argmax())


def test_allowed_token_ids_confine_greedy_and_random_draws():
    logits = torch.randn(1, V) * 3
    allowed = [7, 300, 599]
    assert sample(logits, [row(temperature=0, allowed_token_ids=allowed)]).token_ids == \
        [allowed[int(logits[0, allowed].argmax())]]
    draws = {sample(logits, [row(temperature=2.0, top_k=50, allowed_token_ids=allowed)]).token_ids[0]
             for _ in range(200)}
    assert draws <= set(allowed) and len(draws) > 1


def test_bad_words_ban_the_last_token_only_after_the_rest():
    logits = torch.zeros(1, V)
    logits[0, ord("b")] = 5.0  # "b" is the greedy pick
    logits[0, ord("x")] = 4.0
    pick = lambda output, words: sample(logits, [row(output, temperature=0, bad_words=words)]).token_ids[0]  # noqa: E731
    assert pick([], ["b"]) == ord("x")  # a one-token word is banned everywhere
    assert pick([ord("q")], ["ab"]) == ord("b")  # the prefix "a" was not generated: "b" is allowed
    assert pick([ord("q"), ord("a")], ["ab"]) == ord("x")
    assert pick([ord("a")], ["cab"]) == ord("b")  # "ca" has not been generated (only "a")
    assert pick([ord("c"), ord("a")], ["cab", "zz"]) == ord("x")


def test_bad_words_tokenised_as_vllm_does():
    # the word alone, and after a space when that gives other tokens of the same length
    words = {"bare": [1, 2], " bare": [3, 4], "long": [5, 6], " long": [7, 8, 9], "same": [10], " same": [10]}
    encode = lambda text: words[text]  # noqa: E731
    assert bad_words_token_ids(("bare", " long", "same"), encode) == ((1, 2), (3, 4), (5, 6), (10,))


def test_logprobs_stay_those_of_the_raw_logits():
    logits = torch.randn(1, V)
    result = sample(logits, [row(temperature=0, logprobs=2, logit_bias={5: 50.0}, allowed_token_ids=[5, 6])])
    raw = torch.log_softmax(logits, -1)[0]
    assert result.token_ids == [5]
    assert result.logprobs[0] == pytest.approx(float(raw[5]), abs=1e-6)
    assert [t for t, _ in result.top_logprobs[0]] == raw.topk(2).indices.tolist()


def test_a_mixed_batch_gives_each_row_what_it_would_alone():
    torch.manual_seed(0)
    logits = torch.randn(6, V) * 2

    def rows():  # fresh generators each time: a seeded row's draw depends on its seed alone
        return [row(temperature=0, logit_bias={11: 30.0, 12: -5}),
                row(temperature=0.8, seed=3, allowed_token_ids=list(range(100, 140))),
                row([ord("a")], temperature=0, bad_words=["ab", "c"]),
                row(temperature=0),  # unconstrained neighbours
                row(temperature=1.0, seed=9, top_p=0.9),
                row(temperature=0.7, seed=4, logit_bias={int(logits[5].argmin()): 100}, repetition_penalty=1.2)]

    together = sample(logits, rows()).token_ids
    alone = [sample(logits[i:i + 1], [r]).token_ids[0] for i, r in enumerate(rows())]
    assert together == alone
    assert together[0] == 11 and 100 <= together[1] < 140 and together[5] == int(logits[5].argmin())


@pytest.mark.parametrize("fields, words", [
    ({"logit_bias": {"5": 1.0}}, "logit_bias keys must be token ids"),
    ({"logit_bias": {5: 100.5}}, r"logit_bias values must be numbers in \[-100, 100\]"),
    ({"logit_bias": {5: float("nan")}}, "logit_bias values"),
    ({"allowed_token_ids": []}, "allowed_token_ids must not be empty"),
    ({"allowed_token_ids": [3, -1]}, "allowed_token_ids must hold token ids"),
    ({"bad_words": ["ok", " "]}, "bad_words must hold non-blank strings"),
    ({"prompt_logprobs": 21}, r"prompt_logprobs must be in \[0, 20\]"),
])
def test_bad_values_are_refused_naming_the_field(fields, words):
    with pytest.raises(ValueError, match=words):
        SamplingParams(**fields)


def test_token_ids_outside_the_vocabulary_are_refused():
    with pytest.raises(ValueError, match=r"logit_bias names token id 600, outside the vocabulary \[0, 600\)"):
        SamplingParams(logit_bias={600: 1.0}).check_token_ids(V)
    with pytest.raises(ValueError, match="allowed_token_ids names token id 10000"):
        SamplingParams(allowed_token_ids=[1, 10000]).check_token_ids(V)
    SamplingParams(logit_bias={599: -100}, allowed_token_ids=[0]).check_token_ids(V)
