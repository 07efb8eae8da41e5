"""Structured output and tool calls over HTTP on a tiny random model with SmolLM2's tokenizer: whatever the weights,
the constraint alone makes each answer valid; bad schemas, grammars and tools are 400s naming the field."""

import json
import re

import pytest
from pydantic import BaseModel, Field

from lmforge.engine.async_engine import AsyncEngine
from lmforge.serve.openai_api import create_app
from tests.unit.tiny_server import chat, events, request, run

pytest.importorskip("xgrammar")
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


class City(BaseModel):
    name: str = Field(max_length=12)
    population: int = Field(ge=0, le=10**7)
    capital: bool


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": City.model_json_schema()}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}}}


@pytest.fixture(scope="module")
def app(tiny_chat_model):
    engine = AsyncEngine(model=str(tiny_chat_model), dtype="float32", kv_cache_memory=0.02, max_model_len=512)
    yield create_app(engine, ["tiny"], enable_auto_tool_choice=True, tool_call_parser="hermes")
    engine.shutdown()


def post(app, path: str, body: dict):
    return run(request(app, "POST", path, body))


def test_response_format_json_schema(app):
    schema_format = {"type": "json_schema", "json_schema": {"name": "city", "schema": City.model_json_schema(),
                                                            "strict": True}}
    body = post(app, CHAT, chat(response_format=schema_format, n=3, temperature=1.0, max_tokens=80)).json()
    assert len(body["choices"]) == 3
    for choice in body["choices"]:
        City.model_validate_json(choice["message"]["content"])
    body = post(app, COMPLETIONS, {"prompt": "A city:", "response_format": schema_format, "max_tokens": 80,
                                   "temperature": 0.5, "seed": 1}).json()
    City.model_validate_json(body["choices"][0]["text"])


def test_vllm_structured_outputs_field(app):
    body = post(app, COMPLETIONS, {"prompt": ["x", "y"], "n": 2, "temperature": 1.0, "max_tokens": 10,
                                   "structured_outputs": {"regex": r"[A-Z][a-z]{2}\d"}}).json()
    assert len(body["choices"]) == 4 and all(re.fullmatch(r"[A-Z][a-z]{2}\d", c["text"]) for c in body["choices"])
    body = post(app, CHAT, chat(structured_outputs={"choice": ["yes", "no"]}, temperature=1.0, n=4)).json()
    assert all(c["message"]["content"] in ("yes", "no") for c in body["choices"])
    streamed = events(post(app, CHAT, chat(structured_outputs={"choice": ["left", "right"]}, stream=True)))
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in streamed[:-1] if e["choices"])
    assert text in ("left", "right")


def _args_valid(call: dict) -> None:
    schema = {"get_weather": City, "get_time": None}[call["function"]["name"]]
    arguments = json.loads(call["function"]["arguments"])
    if schema is None:
        assert arguments["zone"] in ("UTC", "CET") and set(arguments) == {"zone"}
    else:
        schema.model_validate(arguments)


@pytest.mark.parametrize("stream", [False, True])
def test_required_and_named_tool_calls_match_their_schemas(app, stream):
    named = {"type": "function", "function": {"name": "get_time"}}
    for choice, finish in (("required", "tool_calls"), (named, "stop")):
        body = chat(tools=[WEATHER, TIME], tool_choice=choice, temperature=1.0, max_tokens=120, n=2, stream=stream,
                    parallel_tool_calls=False)
        response = post(app, CHAT, body)
        assert response.status_code == 200, response.text
        if not stream:
            for c in response.json()["choices"]:
                assert c["finish_reason"] == finish and c["message"]["content"] is None
                assert len(c["message"]["tool_calls"]) == 1
                _args_valid(c["message"]["tool_calls"][0])
            continue
        calls: dict[int, dict] = {}
        finishes = {}
        for e in events(response)[:-1]:
            for c in e["choices"]:
                for d in c["delta"].get("tool_calls") or []:
                    call = calls.setdefault(c["index"], {"function": {"name": "", "arguments": ""}})
                    call["function"]["name"] += d.get("function", {}).get("name", "")
                    call["function"]["arguments"] += d["function"].get("arguments", "")
                if c.get("finish_reason"):
                    finishes[c["index"]] = c["finish_reason"]
        assert sorted(calls) == [0, 1] and finishes == {0: finish, 1: finish}
        for call in calls.values():
            _args_valid(call)


BAD = [
    (chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}),
     "response_format.json_schema.schema"),
    (chat(structured_outputs={"grammar": "root ::= undefined_rule"}), "structured_outputs.grammar"),
    (chat(structured_outputs={"regex": "(unclosed"}), "structured_outputs.regex"),
    (chat(structured_outputs={"json": 5}), "structured_outputs"),
    (chat(structured_outputs={"regex": "a", "choice": ["b"]}), "structured_outputs"),
    (chat(structured_outputs={"colour": "a"}), "structured_outputs.colour"),
    (chat(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "fly"}}), "tool_choice"),
    (chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}],
          tool_choice="required"), "tools[0].function.parameters"),
    (chat(tools=[WEATHER], tool_choice="required", structured_outputs={"regex": "a"}), "tool_choice"),
]


@pytest.mark.parametrize(("body", "param"), BAD, ids=[p for _, p in BAD])
def test_bad_constraints_and_tools_are_400s_naming_the_field(app, body, param):
    response = post(app, CHAT, body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param, response.json()
    assert post(app, CHAT, chat(max_tokens=2)).status_code == 200  # and the server keeps serving
