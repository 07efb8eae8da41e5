"""Tool calls read from model text (recorded outputs in each family's format), tool request validation, streamed
tool_calls deltas, and the reasoning parsers. Malformed output is plain content, never an error."""

import json

import pytest

from lmforge.serve.errors import APIError
from lmforge.serve.reasoning import get_reasoning_parser
from lmforge.serve.tools import ToolStream, get_tool_parser, plan_tools, template_messages

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
                                                "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}

# Outputs in the shapes these families' chat templates teach (Hermes-2-Pro / Qwen2.5, Llama-3.1, Mistral v0.3 and
# the newer [ARGS] form), including two calls at once and text before a call.
FIXTURES = {
    "hermes": [
        ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>',
         None, [("get_weather", {"city": "Paris", "unit": "c"})]),
        ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
         '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
         "Let me check.", [("get_weather", {"city": "Oslo"}), ("get_time", {})]),
    ],
    "llama3_json": [
        ('{"name": "get_weather", "parameters": {"city": "Lima"}}', None, [("get_weather", {"city": "Lima"})]),
        ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Rome"}}; {"name": "get_time", '
         '"parameters": {}}', None, [("get_weather", {"city": "Rome"}), ("get_time", {})]),
    ],
    "mistral": [
        ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Bern"}}, {"name": "get_time", '
         '"arguments": {}}]', None, [("get_weather", {"city": "Bern"}), ("get_time", {})]),
        ('Sure. [TOOL_CALLS]get_weather[ARGS]{"city": "Kyiv", "unit": "f"}', "Sure.",
         [("get_weather", {"city": "Kyiv", "unit": "f"})]),
    ],
}
MALFORMED = {
    "hermes": ['<tool_call>\n{"name": "get_weather", "arguments": {"city": \n</tool_call>', "<tool_call>[1, 2]",
               "no call at all"],
    "llama3_json": ['{"name": "get_weather", "parameters": {"city": "Lima"', '{"city": "Lima"}', "Hello there."],
    "mistral": ["[TOOL_CALLS][{oops}]", "[TOOL_CALLS]get_weather[ARGS]{bad", "plain words"],
}


@pytest.mark.parametrize("parser", sorted(FIXTURES))
def test_recorded_outputs_become_calls(parser):
    for text, content, expected in FIXTURES[parser]:
        got_content, calls = get_tool_parser(parser).parse(text)
        assert got_content == content
        assert [(c.name, json.loads(c.arguments)) for c in calls] == expected
        assert all(c.id.startswith("chatcmpl-tool-") for c in calls) and len({c.id for c in calls}) == len(calls)


@pytest.mark.parametrize("parser", sorted(MALFORMED))
def test_malformed_output_is_plain_content(parser):
    for text in MALFORMED[parser]:
        assert get_tool_parser(parser).parse(text) == (text, [])


@pytest.mark.parametrize(("tools", "choice", "auto", "param", "words"), [
    ([WEATHER], {"type": "function", "function": {"name": "nope"}}, False, "tool_choice", "not among tools"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}], "required", False,
     "tools[0].function.parameters", "of type 'object'"),
    ([{"type": "function", "function": {"name": "f", "parameters": [1]}}], "none", False,
     "tools[0].function.parameters", "of type 'object'"),
    ([{"type": "function", "function": {"name": "bad name!"}}], "required", False, "tools[0].function.name", "1-64"),
    ([{"type": "code_interpreter"}], "required", False, "tools[0]", "'type': 'function'"),
    ([WEATHER], "auto", False, "tool_choice", "--enable-auto-tool-choice"),
    ([WEATHER], None, False, "tool_choice", "--enable-auto-tool-choice"),
    (None, "required", True, "tool_choice", "needs tools"),
    ([WEATHER], "sometimes", True, "tool_choice", "must be 'none'"),
])
def test_bad_tool_requests_are_400s_naming_the_field(tools, choice, auto, param, words):
    with pytest.raises(APIError) as e:
        plan_tools(tools, choice, None, auto)
    assert e.value.status == 400 and e.value.param == param and words in e.value.message


def test_required_and_named_generate_under_the_schema():
    required = plan_tools([WEATHER, TIME], "required", False, False)
    schema = required.constraint.json
    assert schema["maxItems"] == 1 and schema["minItems"] == 1
    assert [a["properties"]["name"]["enum"] for a in schema["items"]["anyOf"]] == [["get_weather"], ["get_time"]]
    content, calls = required.calls('[{"name": "get_time", "parameters": {}}]', None)
    assert content is None and [(c.name, c.arguments) for c in calls] == [("get_time", "{}")]
    assert required.calls('[{"name": "get_ti', None) == ('[{"name": "get_ti', [])  # cut by max_tokens
    named = plan_tools([WEATHER, TIME], {"type": "function", "function": {"name": "get_weather"}}, None, False)
    assert named.constraint.json == WEATHER["function"]["parameters"]
    assert named.calls('{"city": "Oslo"}', None)[1][0].arguments == '{"city": "Oslo"}'
    assert plan_tools([WEATHER], "none", None, False).mode == "none"
    assert plan_tools([WEATHER], None, None, True).mode == "auto"


def test_history_tool_calls_reach_the_template_with_object_arguments():
    call = {"id": "1", "type": "function", "function": {"name": "get_time", "arguments": '{"tz": "UTC"}'}}
    out = template_messages([{"role": "assistant", "tool_calls": [call]}, {"role": "tool", "content": "12:00"}])
    assert out[0]["tool_calls"][0]["function"]["arguments"] == {"tz": "UTC"}
    assert call["function"]["arguments"] == '{"tz": "UTC"}'  # the request itself is not modified


def _stream(stream: ToolStream, pieces: list[str]) -> tuple[str, list[dict]]:
    content, deltas = "", []
    for i, piece in enumerate(pieces):
        text, calls = stream.feed(piece, i == len(pieces) - 1)
        content += text
        deltas += calls
    return content, deltas


def test_streamed_tool_calls():
    named = plan_tools([WEATHER], {"type": "function", "function": {"name": "get_weather"}}, None, False)
    content, deltas = _stream(ToolStream(named, None), ['{"ci', 'ty": "Oslo"', "}", ""])
    assert content == "" and deltas[0]["function"]["name"] == "get_weather" and deltas[0]["id"]
    assert "".join(d["function"]["arguments"] for d in deltas) == '{"city": "Oslo"}'
    assert {d["index"] for d in deltas} == {0}

    auto = plan_tools([WEATHER], "auto", None, True)
    pieces = ["Checking", " now. <tool", '_call>\n{"name": "get_weather", ', '"arguments": {"city": "Oslo"}}',
              "\n</tool_call>"]
    content, deltas = _stream(ToolStream(auto, get_tool_parser("hermes")), pieces)
    assert content == "Checking now. " and len(deltas) == 1
    assert deltas[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    content, deltas = _stream(ToolStream(auto, get_tool_parser("hermes")), ["a <tool_call>{broken", " json"])
    assert content == "a <tool_call>{broken json" and deltas == []
    content, deltas = _stream(ToolStream(auto, get_tool_parser("llama3_json")), [" ", "Hi", " there"])
    assert content == " Hi there" and deltas == []


@pytest.mark.parametrize("parser", sorted(FIXTURES))
def test_parallel_tool_calls_false_keeps_the_first_call(parser):
    """Several calls in one answer (parallel_tool_calls true or absent); false keeps the first, whole and streamed,
    as vLLM's maybe_filter_parallel_tool_calls; `required` then generates exactly one."""
    text, content, expected = next(f for f in FIXTURES[parser] if len(f[2]) == 2)
    for parallel, want in ((None, expected), (True, expected), (False, expected[:1])):
        plan = plan_tools([WEATHER, TIME], "auto", parallel, True)
        got_content, calls = plan.calls(text, get_tool_parser(parser))
        assert got_content == content and [(c.name, json.loads(c.arguments)) for c in calls] == want
        _, deltas = _stream(ToolStream(plan, get_tool_parser(parser)), [text[:9], text[9:], ""])
        assert [(d["index"], d["function"]["name"]) for d in deltas] == [(i, n) for i, (n, _) in enumerate(want)]
    assert "maxItems" not in plan_tools([WEATHER, TIME], "required", True, False).constraint.json
    two = '[{"name": "get_time", "parameters": {}}, {"name": "get_weather", "parameters": {"city": "Oslo"}}]'
    assert [c.name for c in plan_tools([WEATHER, TIME], "required", None, False).calls(two, None)[1]] == \
        ["get_time", "get_weather"]


@pytest.mark.parametrize(("name", "text", "expected"), [
    ("qwen3", "<think>\nplan it\n</think>\n\nThe answer.", ("\nplan it\n", "The answer.")),
    ("qwen3", "No thinking here.", (None, "No thinking here.")),
    ("deepseek_r1", "plan it</think>Answer", ("plan it", "Answer")),
    ("deepseek_r1", "still thinking", ("still thinking", None)),
])
def test_reasoning_split_whole_and_streamed(name, text, expected):
    parser = get_reasoning_parser(name)
    assert parser.split(text) == expected
    stream = parser.stream()
    pieces = [text[i:i + 3] for i in range(0, len(text), 3)]
    got = ["", ""]
    for i, piece in enumerate(pieces):
        r, c = stream.feed(piece, i == len(pieces) - 1)
        got[0] += r
        got[1] += c
    assert (got[0] or None, got[1] or None) == expected
