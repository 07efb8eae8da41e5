import pytest
import torch

from lmforge.engine.sampling_params import SamplingParams
from lmforge.engine.simple_generator import SimpleGenerator, sample
from tests.tiny import tiny_model


def test_greedy_is_argmax():
    logits = torch.tensor([0.1, 3.0, -1.0, 2.9])
    assert sample(logits, SamplingParams(temperature=0), None) == 1


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([5.0, 4.0, 0.0, -1.0, -2.0])
    gen = torch.Generator().manual_seed(0)
    picks = {sample(logits, SamplingParams(temperature=1.0, top_k=2), gen) for _ in range(200)}
    assert picks == {0, 1}
    # probabilities ~ [0.72, 0.27, 0.005, ...]: top_p=0.5 keeps only the first
    picks = {sample(logits, SamplingParams(temperature=1.0, top_p=0.5), gen) for _ in range(100)}
    assert picks == {0}


def test_seeded_sampling_repeats_and_differs_by_seed():
    model = tiny_model()
    gen = SimpleGenerator(model, max_len=64)

    def run(seed):
        return list(gen.stream([1, 2, 3], SamplingParams(temperature=1.0, max_tokens=20, seed=seed)))

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_stream_stops_on_eos_and_honours_ignore_eos():
    model = tiny_model()
    gen = SimpleGenerator(model, max_len=64)
    greedy = list(gen.stream([1, 2, 3], SamplingParams(temperature=0, max_tokens=10)))
    eos = greedy[3]
    stopped = list(gen.stream([1, 2, 3], SamplingParams(temperature=0, max_tokens=10), frozenset({eos})))
    assert stopped == greedy[: greedy.index(eos) + 1]
    ignored = list(gen.stream([1, 2, 3], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
                              frozenset({eos})))
    assert ignored == greedy


@pytest.mark.parametrize("field, value", [("temperature", -0.5), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2),
                                          ("max_tokens", 0)])
def test_invalid_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})
