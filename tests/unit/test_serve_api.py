"""The HTTP API on a tiny random model: every bad input gets its documented status in OpenAI's error shape (and the
server keeps serving); valid requests of every kind come back in OpenAI's shapes, streamed or whole."""

import asyncio
import time

import pytest

from lmforge import AsyncEngine
from lmforge.serve.openai_api import create_app
from tests.unit.tiny_server import MAX_MODEL_LEN, VOCAB, chat, events, request, run, tiny_chat_model, tiny_engine

MODEL = "tiny"
KEY = "sk-test-key"


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    eng = tiny_engine(tmp_path_factory.mktemp("tiny_chat"))
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def app(engine):
    return create_app(engine, [MODEL, "alias"], model_root="/models/tiny", api_key=KEY, max_body_bytes=4096)


AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"

# (route, body, status, param, words in the message); body None means no body, bytes are sent raw
BAD = [
    (CHAT, b"{not json", 400, None, "not valid JSON"),
    (CHAT, b"", 400, None, "body is empty"),
    (CHAT, b"[1, 2]", 400, None, "must be a JSON object"),
    (CHAT, b"{\"messages\": \"\xc3\x28\"}", 400, None, "not UTF-8"),
    (CHAT, b"[" * 2000 + b"]" * 2000, 400, None, "nests JSON too deeply"),
    (COMPLETIONS, b'{"prompt": ["ok", "a\\ud800b"]}', 400, "prompt[1]", "unpaired UTF-16 surrogate"),
    (CHAT, b'{"messages": [{"role": "user", "content": "x", "\\udfff": 1}]}', 400, "messages[0]", "surrogate"),
    (CHAT, {}, 400, "messages", "Missing required parameter"),
    (CHAT, {"messages": []}, 400, "messages", "must not be empty"),
    (CHAT, {"messages": "hi"}, 400, "messages", "valid list"),
    (CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role", "'user'"),
    (CHAT, {"messages": [{"content": "x"}]}, 400, "messages[0].role", "Missing"),
    (CHAT, {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", "string"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "messages[0].content", "text parts only"),
    (CHAT, chat(temperature="hot"), 400, "temperature", "valid number"),
    (CHAT, chat(temperature=3), 400, "temperature", "less than or equal to 2"),
    (CHAT, chat(top_p=0), 400, "top_p", "greater than 0"),
    (CHAT, chat(n=0), 400, "n", "greater than or equal to 1"),
    (CHAT, chat(n=1.5), 400, "n", "valid integer"),
    (CHAT, chat(n=True), 400, "n", "valid integer"),
    (CHAT, chat(max_tokens=-1), 400, "max_tokens", "greater than or equal to 1"),
    (CHAT, chat(max_tokens=10**6), 400, "max_tokens", f"maximum context length is {MAX_MODEL_LEN}"),
    (CHAT, chat(max_completion_tokens=10**6), 400, "max_completion_tokens", "maximum context length"),
    (CHAT, chat("word " * 200), 400, "messages", "the prompt alone"),
    (CHAT, chat(presence_penalty=-3), 400, "presence_penalty", "greater than or equal to -2"),
    (CHAT, chat(seed=2**70), 400, "seed", "less than"),
    (CHAT, chat(stop=[""]), 400, "stop", "must not be empty"),
    (CHAT, chat(stop=5), 400, "stop", "string or a list of strings"),
    (CHAT, chat(top_logprobs=3), 400, "top_logprobs", "requires logprobs"),
    (CHAT, chat(logprobs=True, top_logprobs=50), 400, "top_logprobs", "less than or equal to 20"),
    (CHAT, chat(min_tokens=10, max_tokens=5), 400, "min_tokens", "must not exceed"),
    (CHAT, chat(stream_options={"include_usage": True}), 400, "stream_options", "only allowed when stream"),
    (CHAT, chat(stream=True, stream_options={"include_usage": "yes"}), 400, "stream_options.include_usage", "bool"),
    (CHAT, chat(frobnicate=1), 400, "frobnicate", "Unrecognized request argument"),
    (CHAT, chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tool_choice",
     "--enable-auto-tool-choice"),
    (CHAT, chat(response_format={"type": "xml"}), 400, "response_format", "json_schema"),
    (CHAT, chat(best_of=3), 400, "best_of", "not supported"),
    (CHAT, chat(chat_template_kwargs={"messages": []}), 400, "chat_template_kwargs", "must not set 'messages'"),
    (CHAT, {"messages": [{"role": "tool", "content": "42"}]}, 400, "messages", "rejected the conversation"),
    (CHAT, chat(model="gpt-4"), 404, "model", "does not exist"),
    (COMPLETIONS, {"prompt": []}, 400, "prompt", "must not be empty"),
    (COMPLETIONS, {"prompt": ["a", []]}, 400, "prompt", "must not be empty"),
    (COMPLETIONS, {"prompt": [1, "a"]}, 400, "prompt", "token ids"),
    (COMPLETIONS, {"prompt": {"text": "a"}}, 400, "prompt", "a string, a list of strings"),
    (COMPLETIONS, {"prompt": [1, VOCAB]}, 400, "prompt", "outside the vocabulary"),
    (COMPLETIONS, {"prompt": ["ok", [1, -1]]}, 400, "prompt[1]", "outside the vocabulary"),
    (COMPLETIONS, {"prompt": "x", "logprobs": 21}, 400, "logprobs", "less than or equal to 20"),
    (COMPLETIONS, {"prompt": "x", "logprobs": True}, 400, "logprobs", "valid integer"),
    (COMPLETIONS, {"prompt": "x", "suffix": "y"}, 400, "suffix", "not supported"),
    (COMPLETIONS, {"prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty", "greater than 0"),
    (COMPLETIONS, {"prompt": [1] * MAX_MODEL_LEN}, 400, "prompt", "the prompt alone"),
    (COMPLETIONS, {"prompt": "x", "model": "nope"}, 404, "model", "does not exist"),
    ("/tokenize", {}, 400, "prompt", "exactly one"),
    ("/tokenize", {"prompt": 5}, 400, "prompt", "valid string"),
    ("/detokenize", {"tokens": [VOCAB + 5]}, 400, "tokens", "outside the vocabulary"),
    ("/detokenize", {"tokens": "abc"}, 400, "tokens", "valid list"),
    (CHAT, b'{"messages": [{"role": "user", "content": "' + b"x" * 5000 + b'"}]}', 413, None, "exceeds 4096 bytes"),
]


def assert_error(response, status: int, param: str | None, words: str | None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"] and "\n" not in error["message"]
    assert error["type"] == ("invalid_request_error" if status < 500 else "server_error")
    assert error["param"] == param, error
    if words is not None:
        assert words in error["message"], error["message"]
    return error


@pytest.mark.parametrize(("route", "body", "status", "param", "words"), BAD,
                         ids=[f"{i}-{r.rsplit('/', 1)[-1]}-{p or s}" for i, (r, _, s, p, _) in enumerate(BAD)])
def test_bad_input_gets_its_status_and_the_error_shape(app, route, body, status, param, words):
    error = assert_error(run(request(app, "POST", route, body, AUTH)), status, param, words)
    if status == 404:
        assert error["code"] == "model_not_found"


def test_server_still_serves_after_the_bad_inputs(app):
    async def main():
        bad = [request(app, "POST", route, body, AUTH) for route, body, *_ in BAD]
        good = request(app, "POST", CHAT, chat(max_tokens=4, temperature=0), AUTH)
        return await asyncio.gather(*bad, good)

    *bad, good = run(main())
    assert [r.status_code for r in bad] == [status for _, _, status, _, _ in BAD]
    assert good.status_code == 200 and good.json()["choices"][0]["message"]["role"] == "assistant"


@pytest.mark.parametrize(("headers", "words"), [({}, "No API key"), ({"Authorization": "Bearer wrong"}, "Incorrect"),
                                                ({"Authorization": KEY}, "Incorrect")])
def test_missing_or_wrong_key_is_401(app, headers, words):
    for method, path, body in (("POST", CHAT, chat()), ("GET", "/v1/models", None)):
        error = assert_error(run(request(app, method, path, body, headers)), 401, None, words)
        assert error["code"] == "invalid_api_key"


def test_open_routes_need_no_key(app):
    for path in ("/health", "/version", "/metrics"):
        assert run(request(app, "GET", path)).status_code == 200, path


def test_unknown_route_and_method(app):
    error = assert_error(run(request(app, "GET", "/v2/everything", None, AUTH)), 404, None, "Unknown route")
    assert error["code"] == "not_found"
    assert_error(run(request(app, "DELETE", "/v1/models", None, AUTH)), 405, None, "not allowed")
    assert run(request(app, "DELETE", "/v1/models", None, AUTH)).headers["allow"] == "GET"


def test_invalid_route_parameters_are_400s_in_the_error_shape(engine):
    """No route declares a parameter FastAPI validates today; one that did would answer a 400 in OpenAI's shape
    (what the schema documents), not FastAPI's 422 {"detail": ...}."""
    app = create_app(engine, [MODEL])

    @app.get("/probe")
    async def probe(count: int) -> dict:
        return {"count": count}

    assert_error(run(request(app, "GET", "/probe?count=many")), 400, "count", "valid integer")
    assert "422" not in str(run(request(app, "GET", "/openapi.json")).json())


def test_declared_oversized_body_is_refused_before_reading(app):
    headers = {**AUTH, "Content-Length": "999999", "Content-Type": "application/json"}
    assert_error(run(request(app, "POST", CHAT, b"{}" + b" " * 999997, headers)), 413, None, "exceeds")


def test_max_queue_is_a_503_with_retry_after(tmp_path):
    one_seat = AsyncEngine(model=str(tiny_chat_model(tmp_path)), dtype="float32", kv_cache_memory=0.002,
                           block_size=4, max_num_seqs=1)
    app = create_app(one_seat, [MODEL], max_queue=1)

    async def main():
        # While the engine thread is busy, all four adds queue up and are admitted in one go: the first takes the
        # batch's one free place, the second waits beyond it (the one --max-queue allows), the others are refused.
        busy = asyncio.ensure_future(one_seat.run(lambda: time.sleep(0.3)))
        await asyncio.sleep(0.05)
        responses = await asyncio.gather(*(request(app, "POST", CHAT, chat(max_tokens=2)) for _ in range(4)))
        await busy
        return responses

    try:
        responses = run(main())
    finally:
        one_seat.shutdown()
    assert sorted(r.status_code for r in responses) == [200, 200, 503, 503]
    for r in responses:
        if r.status_code == 503:
            assert r.headers["Retry-After"] == "1"
            assert_error(r, 503, None, "busy")
    assert 'lmforge:request_rejected_total{model_name="tiny"} 2.0' in run(request(app, "GET", "/metrics")).text


def test_models_health_version(app):
    models = run(request(app, "GET", "/v1/models", None, AUTH)).json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [MODEL, "alias"]
    assert models["data"][0]["max_model_len"] == MAX_MODEL_LEN and models["data"][0]["root"] == "/models/tiny"
    assert run(request(app, "GET", "/v1/models/alias", None, AUTH)).json()["id"] == "alias"
    assert_error(run(request(app, "GET", "/v1/models/other", None, AUTH)), 404, "model", "does not exist")
    assert run(request(app, "GET", "/version")).json()["version"]


def test_tokenize_detokenize_round_trip(app):
    ids = run(request(app, "POST", "/tokenize", {"prompt": "hello world"}, AUTH)).json()
    assert ids["count"] == len(ids["tokens"]) > 0 and ids["max_model_len"] == MAX_MODEL_LEN
    text = run(request(app, "POST", "/detokenize", {"tokens": ids["tokens"]}, AUTH)).json()["prompt"]
    assert text == "hello world"
    templated = run(request(app, "POST", "/tokenize", {"messages": [{"role": "user", "content": "hi"}]},
                            AUTH)).json()
    usage = run(request(app, "POST", CHAT, chat("hi", max_tokens=1), AUTH)).json()["usage"]
    assert templated["count"] == usage["prompt_tokens"]


def test_cors_preflight_skips_the_key(engine):
    app = create_app(engine, [MODEL], api_key=KEY, cors_origins=["https://ui.example"])
    headers = {"Origin": "https://ui.example", "Access-Control-Request-Method": "POST"}
    response = run(request(app, "OPTIONS", CHAT, None, headers))
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "https://ui.example"


def test_chat_whole_response_shape(app):
    body = run(request(app, "POST", CHAT, chat(max_tokens=5, n=2, ignore_eos=True, logprobs=True, top_logprobs=2,
                                               model="alias"), AUTH)).json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-") and body["model"] == "alias"
    assert [c["index"] for c in body["choices"]] == [0, 1]
    for choice in body["choices"]:
        assert choice["finish_reason"] == "length" and choice["message"]["role"] == "assistant"
        content = choice["logprobs"]["content"]
        assert len(content) == 5 and all(len(t["top_logprobs"]) == 2 for t in content)
        assert all(t["top_logprobs"][0]["logprob"] >= t["top_logprobs"][1]["logprob"] for t in content)
        assert all(t["logprob"] <= 0 and t["bytes"] == list(t["token"].encode()) for t in content)
    usage = body["usage"]
    assert usage["completion_tokens"] == 10 and usage["total_tokens"] == usage["prompt_tokens"] + 10
    assert usage["prompt_tokens_details"]["cached_tokens"] >= 0


def test_chat_stream_is_framed_as_openai_frames_it(app):
    response = run(request(app, "POST", CHAT, chat(max_tokens=4, n=2, ignore_eos=True, stream=True,
                                                   stream_options={"include_usage": True}), AUTH))
    assert response.headers["content-type"].startswith("text/event-stream")
    chunks = events(response)
    assert chunks[-1] == "[DONE]" and all(isinstance(c, dict) for c in chunks[:-1])
    assert {c["id"] for c in chunks[:-1]} == {chunks[0]["id"]}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks[:-1])
    assert [c["choices"][0]["delta"] for c in chunks[:2]] == [{"role": "assistant", "content": ""}] * 2
    assert [c["choices"][0]["index"] for c in chunks[:2]] == [0, 1]
    usage_chunk = chunks[-2]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 8
    body = chunks[2:-2]
    for index in (0, 1):
        mine = [c["choices"][0] for c in body if c["choices"][0]["index"] == index]
        assert mine[-1]["delta"] == {} and mine[-1]["finish_reason"] == "length"
        assert all(c["finish_reason"] is None and "content" in c["delta"] for c in mine[:-1])
    assert all(c["usage"] is None for c in chunks[:-2])


def test_streamed_text_equals_whole_text(app):
    fields = {"max_tokens": 12, "temperature": 0, "ignore_eos": True, "stop": ["ab"]}
    whole = run(request(app, "POST", CHAT, chat("same prompt", **fields), AUTH)).json()["choices"][0]
    streamed = events(run(request(app, "POST", CHAT, chat("same prompt", stream=True, **fields), AUTH)))
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in streamed[:-1] if c["choices"])
    assert text == whole["message"]["content"]
    assert streamed[-2]["choices"][0]["finish_reason"] == whole["finish_reason"]


def test_completions_of_many_prompts(app):
    prompts = ["first prompt", [5, 6, 7]]
    body = run(request(app, "POST", COMPLETIONS, {"prompt": prompts, "n": 2, "max_tokens": 3, "ignore_eos": True,
                                                  "logprobs": 1, "echo": False}, AUTH)).json()
    assert body["object"] == "text_completion" and [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    for choice in body["choices"]:
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 3
        assert lp["text_offset"][0] == 0 and all(1 <= len(t) <= 2 for t in lp["top_logprobs"])
    assert body["usage"]["completion_tokens"] == 12


def test_completions_echo_and_default_max_tokens(app):
    body = run(request(app, "POST", COMPLETIONS, {"prompt": "echo me", "echo": True, "ignore_eos": True},
                       AUTH)).json()
    choice = body["choices"][0]
    assert choice["text"].startswith("echo me") and body["usage"]["completion_tokens"] == 16  # OpenAI's default
    streamed = events(run(request(app, "POST", COMPLETIONS, {"prompt": "echo me", "echo": True, "ignore_eos": True,
                                                             "stream": True, "temperature": 0}, AUTH)))
    assert streamed[0]["choices"][0]["text"] == "echo me"
    assert streamed[-2]["choices"][0]["finish_reason"] == "length" and streamed[-1] == "[DONE]"


def test_seeded_sampling_repeats(app):
    fields = {"prompt": "seeded", "max_tokens": 8, "temperature": 1.0, "seed": 1234, "ignore_eos": True, "n": 2}
    first, second = (run(request(app, "POST", COMPLETIONS, fields, AUTH)).json() for _ in range(2))
    texts = [c["text"] for c in first["choices"]]
    assert texts == [c["text"] for c in second["choices"]]
    assert texts[0] != texts[1]  # the n completions get seed + index, as in the offline API
