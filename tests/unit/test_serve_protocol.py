"""The request models alone: what they accept, how they normalise it, and which field an error names."""

import pytest
from pydantic import ValidationError

from lmforge.serve.errors import from_validation, param_path
from lmforge.serve.protocol import ChatCompletionRequest, CompletionRequest
from lmforge.serve.responses import ChatChunkChoice, ChatCompletionChunk, Delta


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], **fields})


def error_of(model, data) -> tuple[str | None, str]:
    with pytest.raises(ValidationError) as info:
        model.model_validate(data)
    e = from_validation(info.value)
    return e.param, e.message


def test_defaults_leave_sampling_to_the_engine():
    req = chat()
    assert req.model is None and req.n == 1 and req.stream is False and req.stop == []
    assert all(getattr(req, f) is None for f in ("temperature", "top_p", "top_k", "max_tokens", "seed"))


@pytest.mark.parametrize(("prompt", "normalised"), [
    ("text", ["text"]),
    (["a", "b"], ["a", "b"]),
    ([1, 2, 3], [[1, 2, 3]]),
    ([[1, 2], [3]], [[1, 2], [3]]),
    (["a", [4, 5]], ["a", [4, 5]]),
])
def test_completion_prompt_forms(prompt, normalised):
    assert CompletionRequest.model_validate({"prompt": prompt}).prompt == normalised


@pytest.mark.parametrize("prompt", [[True, 1], [1.5], [["a"]], None, 7])
def test_completion_prompt_rejects_other_shapes(prompt):
    param, message = error_of(CompletionRequest, {"prompt": prompt})
    assert param == "prompt" and "token ids" in message


def test_stop_is_a_list():
    assert chat(stop="END").stop == ["END"]
    assert chat(stop=["a", "b"]).stop == ["a", "b"]
    assert chat(stop=None).stop == []


def test_text_parts_join_and_developer_is_system():
    req = ChatCompletionRequest.model_validate({"messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]}]})
    assert [m.template_dict() for m in req.messages] == [{"role": "system", "content": "be brief"},
                                                        {"role": "user", "content": "one\ntwo"}]


def test_strict_types_are_not_coerced():
    assert error_of(ChatCompletionRequest, {"messages": [{"role": "user", "content": "x"}], "n": "2"})[0] == "n"
    assert error_of(ChatCompletionRequest, {"messages": [{"role": "user", "content": "x"}], "stream": "true"})[0] \
        == "stream"
    assert chat(temperature=1).temperature == 1.0  # an integer is a valid number


def test_error_names_nested_fields():
    assert param_path(("messages", 3, "content")) == "messages[3].content"
    assert param_path(("stream_options", "include_usage")) == "stream_options.include_usage"
    param, message = error_of(ChatCompletionRequest, {"messages": [{"role": "user", "content": "x", "colour": 1}]})
    assert param == "messages[0].colour" and message == "Unrecognized request argument supplied: messages[0].colour"
    param, message = error_of(ChatCompletionRequest, {"messages": [{"role": "user", "content": "x"}], "n": 0})
    assert message == "Invalid value for 'n': Input should be greater than or equal to 1 (got 0)."


@pytest.mark.parametrize(("fields", "param"), [
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
])
def test_combinations_and_unsupported_fields(fields, param):
    assert chat(**fields).combination_error()[0] == param


def test_supported_combinations_pass():
    for fields in ({}, {"logprobs": True, "top_logprobs": 0}, {"stream": True, "stream_options": {}},
                   {"response_format": {"type": "text"}}, {"tools": None}, {"logit_bias": {}}, {"best_of": 1},
                   {"logit_bias": {"1": 1}}, {"prompt_logprobs": 2}, {"allowed_token_ids": [1], "bad_words": ["x"]}):
        assert chat(**fields).combination_error() is None, fields
    for fields in ({"echo": True}, {"echo": True, "logprobs": 1}, {"echo": True, "max_tokens": 0, "logprobs": 0}):
        assert CompletionRequest.model_validate({"prompt": "x", **fields}).combination_error() is None
    assert CompletionRequest.model_validate({"prompt": "x", "max_tokens": 0}).combination_error()[0] == "max_tokens"
    assert chat(logit_bias={"007": -100, "3": 2.5}).logit_bias == {7: -100, 3: 2.5}


def test_delta_leaves_out_what_it_does_not_change():
    chunk = ChatCompletionChunk(id="c", created=0, model="m", choices=[ChatChunkChoice(index=0, delta=Delta())])
    dumped = chunk.model_dump(mode="json")
    assert dumped["choices"][0]["delta"] == {} and dumped["choices"][0]["finish_reason"] is None
    assert Delta(content="x").model_dump() == {"content": "x"}
