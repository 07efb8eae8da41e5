import pytest

from lmforge.engine.sampling_params import SamplingParams


@pytest.mark.parametrize("field, value", [
    ("n", 0), ("temperature", -0.5), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2), ("min_p", 1.5),
    ("repetition_penalty", 0.0), ("presence_penalty", 3.0), ("frequency_penalty", -2.5), ("max_tokens", 0),
    ("min_tokens", 99), ("logprobs", 21), ("stop", ("",)),
])
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"SamplingParams.{field} "):
        SamplingParams(**{field: value})


def test_normalisation():
    p = SamplingParams(stop="END", top_k=-1, stop_token_ids=[5])
    assert p.stop == ("END",) and p.top_k == 0 and p.stop_token_ids == (5,)
    assert SamplingParams(temperature=0).greedy and not SamplingParams().greedy
