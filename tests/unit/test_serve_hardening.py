"""What a hostile-input probe of the server found (issue 17, item 7), each point tried as an attacker would on a tiny
random model: one request or client must never harm another's answers, stall the server, read its file system,
crowd out requests that fit the batch, or end in a 500 or a traceback."""

import asyncio
import json
import logging
import socket
import threading
import time

import httpx
import pytest
from safetensors.torch import load_file, save_file

from lmforge import AsyncEngine, SamplingParams
from lmforge.engine.lora_manager import LoRARequest
from lmforge.serve.openai_api import create_app
from tests.adapters import save_peft_adapter
from tests.unit.test_serve_api import assert_error
from tests.unit.tiny_server import MAX_MODEL_LEN, LiveApp, chat, request, run, tiny_chat_model, tiny_engine

pytest.importorskip("peft")

KEY = "sk-hardening"
AUTH = {"Authorization": f"Bearer {KEY}"}
LOAD, COMPLETIONS, CHAT = "/v1/load_lora_adapter", "/v1/completions", "/v1/chat/completions"
PROMPT = [5, 17, 33, 2, 90, 41]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("hardening")
    base = tiny_chat_model(root / "base")
    adapters = root / "adapters"
    save_peft_adapter(base, adapters / "a", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    save_peft_adapter(base, adapters / "bad", seed=2, r=4, lora_alpha=8, target_modules="all-linear")
    save_peft_adapter(base, adapters / "nan", seed=3, r=4, target_modules=["q_proj"])
    weights = adapters / "nan" / "adapter_model.safetensors"
    tensors = load_file(weights)
    next(iter(tensors.values()))[0, 0] = float("nan")
    save_file(tensors, weights)
    return root


@pytest.fixture(scope="module")
def engine(files):
    eng = AsyncEngine(model=str(files / "base"), dtype="float32", kv_cache_memory=0.004, block_size=4,
                      enable_lora=True, max_loras=3, max_lora_rank=8)
    run(eng.add_lora(LoRARequest("a", 1, str(files / "adapters" / "a"))))
    yield eng
    eng.shutdown()


def lora_app(engine, files, **options):
    return create_app(engine, ["tiny"], model_root=str(files / "base"), allow_runtime_lora_updating=True, **options)


def load(app, name: str, path: str, headers=None) -> httpx.Response:
    return run(request(app, "POST", LOAD, {"lora_name": name, "lora_path": path}, headers))


# ---- 1. NaN adapters ------------------------------------------------------------------------------------------
def test_a_nan_adapter_is_refused_at_load(engine, files):
    app = lora_app(engine, files, allowed_lora_paths=[str(files / "adapters")])
    assert_error(load(app, "nan", str(files / "adapters" / "nan")), 400, "lora_path", "holds NaN or infinite values")
    assert [m["id"] for m in run(request(app, "GET", "/v1/models")).json()["data"]] == ["tiny", "a"]


def test_a_loaded_nan_adapter_changes_no_other_requests_answer(engine, files):
    """Poked into its slot past the load check, a NaN adapter's values reach its own rows only: base and adapter
    requests batched with it answer as before, and its own logprobs (NaN) come back as numbers, not a 500."""
    app = lora_app(engine, files)
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True, "logprobs": 2}

    def answers() -> list[httpx.Response]:
        async def go():
            return await asyncio.gather(*(request(app, "POST", COMPLETIONS, {**body, "model": m})
                                          for m in ("tiny", "a", "bad", "tiny", "a", "bad")))
        return run(go())

    layers = list(engine.engine.loras.layers.values())
    without = [(m.lora_a.clone(), m.lora_b.clone()) for m in layers]
    assert load(app, "bad", str(files / "adapters" / "bad")).status_code == 200
    try:
        before = [r.json()["choices"][0] for r in answers()]

        def poison():  # every value the adapter wrote into the slot buffers becomes NaN, whatever their layout
            for m, (a, b) in zip(layers, without, strict=True):
                for buffer, old in ((m.lora_a, a), (m.lora_b, b)):
                    buffer[buffer != old] = float("nan")

        run(engine.run(poison))
        after = answers()
    finally:
        run(request(app, "POST", "/v1/unload_lora_adapter", {"lora_name": "bad"}))
    assert all(r.status_code == 200 for r in after), [r.text for r in after]
    choices = [r.json()["choices"][0] for r in after]
    for i in (0, 1, 3, 4):  # base and `a`: token for token, log-prob for log-prob as before
        assert choices[i]["text"] == before[i]["text"]
        assert choices[i]["logprobs"]["token_logprobs"] == pytest.approx(before[i]["logprobs"]["token_logprobs"],
                                                                         abs=1e-5)
    assert choices[2]["logprobs"]["token_logprobs"] == [-9999.0] * 8  # NaN log-probs, sent as vLLM clamps them


# ---- 2. tokenising off the event loop -------------------------------------------------------------------------
def test_a_15mb_prompt_does_not_stall_a_running_stream(tmp_path):
    eng = tiny_engine(tmp_path)
    app = create_app(eng, ["tiny"], api_key=KEY)
    gaps, answer = [], {}
    try:
        with LiveApp(app) as live:
            started = threading.Event()

            def big_tokenize():
                started.wait(30)
                text = "lorem ipsum dolor sit amet " * (15 * 2**20 // 27)
                answer["r"] = httpx.post(live.url + "/tokenize", json={"prompt": text}, headers=AUTH, timeout=60)

            sender = threading.Thread(target=big_tokenize)
            sender.start()
            body = chat(max_tokens=MAX_MODEL_LEN // 2, ignore_eos=True, stream=True)
            # the engine paced to ~50 ms a token, so the stream outlasts the big request
            slow = threading.Event()

            def pace():
                while not slow.is_set():
                    eng._call(lambda: time.sleep(0.05)).result()

            pacer = threading.Thread(target=pace)
            pacer.start()
            try:
                with httpx.stream("POST", live.url + CHAT, json=body, headers=AUTH, timeout=60) as response:
                    assert response.status_code == 200
                    last = None
                    for _ in response.iter_lines():
                        now = time.monotonic()
                        if last is not None:
                            gaps.append(now - last)
                        last = now
                        started.set()
            finally:
                slow.set()
                pacer.join()
            sender.join(60)
    finally:
        eng.shutdown()
    r = answer["r"]
    assert_error(r, 400, "prompt", "characters; no text of more than")
    assert len(gaps) > 40 and max(gaps) < 1.0, max(gaps)


def test_over_long_prompts_are_refused_before_tokenising(engine, files):
    app = create_app(engine, ["tiny"])
    limit = app.state.lmforge.max_prompt_chars
    assert limit == MAX_MODEL_LEN * engine.tokenizer.longest_token_chars()
    long = "x" * (limit + 1)
    assert_error(run(request(app, "POST", COMPLETIONS, {"prompt": ["ok", long]})), 400, "prompt[1]", "characters")
    assert_error(run(request(app, "POST", CHAT, chat(long))), 400, "messages", "characters")
    assert_error(run(request(app, "POST", "/tokenize", {"messages": [{"role": "user", "content": long}]})), 400,
                 "messages", "characters")
    assert_error(run(request(app, "POST", COMPLETIONS, {"prompt": [1] * 10**5})), 400, "prompt", "the prompt alone")
    assert_error(run(request(app, "POST", "/detokenize", {"tokens": [1] * 10**5})), 400, "tokens", "At most")


def test_tokenizer_routes_need_the_key(engine):
    app = create_app(engine, ["tiny"], api_key=KEY, enable_tokenizer_info_endpoint=True)
    for path, body in (("/tokenize", {"prompt": "hi"}), ("/detokenize", {"tokens": [5]})):
        assert_error(run(request(app, "POST", path, body)), 401, None, "No API key")
        assert run(request(app, "POST", path, body, AUTH)).status_code == 200
    assert_error(run(request(app, "GET", "/tokenizer_info")), 401, None, "No API key")


# ---- 3. run-time adapter loading ------------------------------------------------------------------------------
def test_run_time_loading_is_off_unless_enabled(engine, files, monkeypatch):
    app = create_app(engine, ["tiny"])
    for path, body in ((LOAD, {"lora_name": "x", "lora_path": str(files / "adapters" / "a")}),
                       ("/v1/unload_lora_adapter", {"lora_name": "a"})):
        assert_error(run(request(app, "POST", path, body)), 404, None, "--allow-runtime-lora-updating")
    assert [m["id"] for m in run(request(app, "GET", "/v1/models")).json()["data"]] == ["tiny", "a"]
    from lmforge.serve.adapters import runtime_updating_from_env

    assert not runtime_updating_from_env()
    for value, on in (("1", True), ("true", True), ("True ", True), ("0", False), ("yes", False)):
        monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", value)
        assert runtime_updating_from_env() is on


def hostile_paths(files, tmp_path) -> dict[str, str]:
    (tmp_path / "a_file").write_text("{}")
    (tmp_path / "empty_dir").mkdir()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "adapter_config.json").write_text(json.dumps({"peft_type": "PROMPT_TUNING", "secret": "s3cr3t"}))
    return {"missing": str(tmp_path / "no" / "such"), "file": str(tmp_path / "a_file"),
            "empty dir": str(tmp_path / "empty_dir"), "foreign config": str(foreign), "root": "/",
            "etc": "/etc", "proc": "/proc/self", "long": "/" + "x" * 5000, "long name": "/tmp/" + "y" * 300,
            "deep": "/".join(["d"] * 1500), "too deep": "/".join(["d"] * 2100), "nul": "/tmp/a\0b",
            "relative": "../../..", "dots": "....",
            "unicode": "/tmp/\u00e9\u4e2d", "space": " ", "tilde": "~root"}


def test_no_lora_path_gives_a_500_or_discloses_the_file_system(engine, files, tmp_path):
    app = lora_app(engine, files, api_key=KEY)
    messages = set()
    for i, (what, path) in enumerate(hostile_paths(files, tmp_path).items()):
        r = load(app, f"x{i}", path, AUTH)
        error = assert_error(r, 400, "lora_path", None)
        assert "s3cr3t" not in error["message"] and "PROMPT_TUNING" not in error["message"], what
        assert "not found" not in error["message"] and "has no" not in error["message"], what
        messages.add(error["message"])
    assert len(messages) == 2  # one sentence for every unloadable adapter, one for paths no file system takes
    assert [m["id"] for m in run(request(app, "GET", "/v1/models", None, AUTH)).json()["data"]] == ["tiny", "a"]


def test_allowed_lora_paths_confine_loading(engine, files, tmp_path):
    app = lora_app(engine, files, allowed_lora_paths=[str(files / "adapters")])
    escape = files / "adapters" / "escape"
    escape.symlink_to(tmp_path)
    for path in ("/etc", str(files / "adapters" / ".." / "base"), str(escape), str(files / "adapters-x")):
        assert_error(load(app, "x", path), 400, "lora_path", "outside the directories")
    assert_error(load(app, "x", str(files / "adapters" / "none")), 400, "lora_path", "not found")  # inside: detailed
    r = load(app, "b", str(files / "adapters" / "bad"))
    assert r.status_code == 200
    assert run(request(app, "POST", "/v1/unload_lora_adapter", {"lora_name": "b"})).status_code == 200


# ---- 4. --max-queue ---------------------------------------------------------------------------------------------
def test_max_queue_counts_only_requests_the_batch_has_no_room_for(engine):
    app = create_app(engine, ["tiny"], max_queue=8)

    async def burst():
        return await asyncio.gather(*(request(app, "POST", COMPLETIONS, {"prompt": [5, 6, i % 50 + 7], "max_tokens": 2})
                                      for i in range(200)))

    responses = run(burst())
    assert [r.status_code for r in responses] == [200] * 200


# ---- 5. range checks --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("fields", "param", "words"), [
    ({"stop_token_ids": [-1]}, "stop_token_ids", ">= 0"),
    ({"stop_token_ids": [10**12]}, "stop_token_ids", "outside the vocabulary"),
    ({"stop_token_ids": [3, 550]}, "stop_token_ids", "outside the vocabulary"),
    ({"stop_token_ids": [1] * 1025}, "stop_token_ids", "at most 1024"),
    ({"stop": ["x"] * 1025}, "stop", "at most 1024"),
    ({"top_k": 2**70}, "top_k", "less than 2147483648"),
    ({"top_k": -2}, "top_k", "greater than or equal to -1"),
])
def test_out_of_range_values_are_a_400_naming_the_field(engine, fields, param, words):
    app = create_app(engine, ["tiny"])
    for route, body in ((COMPLETIONS, {"prompt": "hi", **fields}), (CHAT, chat(**fields))):
        assert_error(run(request(app, "POST", route, body)), 400, param, words)


def test_sampling_params_bound_top_k_and_stop_token_ids():
    for bad in ({"top_k": 2**70}, {"top_k": 2**31}, {"stop_token_ids": (-1,)}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingParams(**bad)
    assert SamplingParams(top_k=2**31 - 1, stop_token_ids=(0, 7)).top_k == 2**31 - 1


# ---- 6. 405 and shutdown ------------------------------------------------------------------------------------
def test_405_names_the_allowed_methods(engine):
    app = create_app(engine, ["tiny"])
    for method, path, allowed in (("DELETE", "/v1/models", "GET"), ("GET", CHAT, "POST"), ("PUT", "/health", "GET")):
        r = run(request(app, method, path))
        assert_error(r, 405, None, "not allowed")
        assert set(r.headers["allow"].replace(" ", "").split(",")) >= {allowed}, r.headers


def test_requests_cut_at_shutdown_timeout_end_with_an_error_event(tmp_path, caplog):
    eng = tiny_engine(tmp_path)
    app = create_app(eng, ["tiny"])
    results: dict[str, object] = {}
    try:
        live = LiveApp(app, shutdown_timeout=0.5)

        def stream():
            body = chat(max_tokens=50, ignore_eos=True, stream=True)
            with httpx.stream("POST", live.url + CHAT, json=body, timeout=60) as r:
                results["stream"] = [line for line in r.iter_lines() if line]

        def whole():
            results["whole"] = httpx.post(live.url + COMPLETIONS, json={"prompt": "hi", "max_tokens": 50,
                                                                        "ignore_eos": True}, timeout=60)

        hold = eng._call(lambda: time.sleep(2.0))  # the engine busy: both requests wait past the timeout
        clients = [threading.Thread(target=f) for f in (stream, whole)]
        uvicorn_log = logging.getLogger("uvicorn.error")  # uvicorn's loggers do not propagate to the root
        uvicorn_log.addHandler(caplog.handler)
        with caplog.at_level(logging.INFO):
            for t in clients:
                t.start()
            time.sleep(0.5)
            live.stop()
            hold.result()
            for t in clients:
                t.join(30)
        uvicorn_log.removeHandler(caplog.handler)
    finally:
        eng.shutdown()
    lines = results["stream"]
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2].removeprefix("data: "))["error"]
    assert "shutting down" in error["message"] and error["type"] == "server_error"
    assert_error(results["whole"], 503, None, "shutting down")
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]
    assert not [r for r in caplog.records if "Cancel" in r.getMessage()]  # uvicorn had nothing left to cancel


# ---- 7. schema, tokenizer info, chat_template_kwargs ---------------------------------------------------------
def test_openapi_schema_describes_the_request_bodies(engine, files):
    app = create_app(engine, ["tiny"], api_key=KEY)
    schema = run(request(app, "GET", "/openapi.json")).json()  # open: clients and fuzzers read it without a key
    body = schema["paths"][CHAT]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/ChatCompletionRequest"}
    assert "ChatMessage" in schema["components"]["schemas"]
    assert {"/v1/completions", "/v1/models", "/tokenize", "/detokenize", "/health"} <= set(schema["paths"])
    assert LOAD not in schema["paths"]  # run-time loading is off here
    assert LOAD in run(request(lora_app(engine, files), "GET", "/openapi.json")).json()["paths"]


def test_tokenizer_info_as_vllm_serves_it(engine):
    assert run(request(create_app(engine, ["tiny"]), "GET", "/tokenizer_info")).status_code == 404  # off by default
    app = create_app(engine, ["tiny"], enable_tokenizer_info_endpoint=True, chat_template="{{ messages }}")
    info = run(request(app, "GET", "/tokenizer_info")).json()
    assert info["tokenizer_class"] and info["model_max_length"] == MAX_MODEL_LEN
    assert info["chat_template"] == "{{ messages }}" and info.get("eos_token") == engine.tokenizer.eos_token


def test_tokenize_takes_chat_template_kwargs(engine):
    app = create_app(engine, ["tiny"])
    messages = [{"role": "user", "content": "hi"}]
    r = run(request(app, "POST", "/tokenize", {"messages": messages, "chat_template_kwargs": {"flag": True}}))
    assert r.status_code == 200
    usage = run(request(app, "POST", CHAT, {"messages": messages, "max_tokens": 1,
                                            "chat_template_kwargs": {"flag": True}})).json()["usage"]
    assert r.json()["count"] == usage["prompt_tokens"]
    assert_error(run(request(app, "POST", "/tokenize", {"messages": messages, "chat_template_kwargs": {"tools": 1}})),
                 400, "chat_template_kwargs", "must not set 'tools'")


# ---- 8. slow clients --------------------------------------------------------------------------------------------
def test_connections_that_trickle_their_headers_are_closed(engine):
    app = create_app(engine, ["tiny"])
    with LiveApp(app, header_timeout=0.5) as live:
        slow = [socket.create_connection(("127.0.0.1", live.port)) for _ in range(5)]
        idle = socket.create_connection(("127.0.0.1", live.port))
        start = time.monotonic()
        closed = set()
        while time.monotonic() - start < 3 and len(closed) < len(slow):
            for i, s in enumerate(slow):
                if i in closed:
                    continue
                try:
                    s.sendall(b"GET /health HTTP/1.1\r\n" if time.monotonic() - start < 0.05 else b"X")
                except OSError:
                    closed.add(i)
            time.sleep(0.1)
        elapsed = time.monotonic() - start
        idle.settimeout(3)
        assert idle.recv(10) == b""  # closed without a byte sent either
        assert len(closed) == len(slow) and elapsed < 2.5, elapsed
        assert httpx.get(live.url + "/health", timeout=5).status_code == 200  # a normal client is served
        for s in [*slow, idle]:
            s.close()


def test_a_body_trickled_after_its_headers_is_answered_408_and_disconnected(engine):
    """Slow-loris on the body: the head arrives at once (--header-timeout is satisfied), then a byte every 0.1 s of
    a declared 1000. The body deadline answers 408 and closes the connection; other clients are served meanwhile."""
    app = create_app(engine, ["tiny"], body_timeout=0.5)
    with LiveApp(app) as live:
        slow = socket.create_connection(("127.0.0.1", live.port))
        slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{")
        start, answer = time.monotonic(), b""
        slow.settimeout(0.1)
        while time.monotonic() - start < 5:
            try:
                slow.sendall(b" ")
                got = slow.recv(4096)
            except TimeoutError:
                continue
            except OSError:  # reset: closed by the server
                break
            if not got:  # closed by the server
                break
            answer += got
        elapsed = time.monotonic() - start
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
        assert b'"code":"request_timeout"' in answer and b"connection: close" in answer.lower()
        assert 0.4 < elapsed < 2.5, elapsed
        assert httpx.get(live.url + "/health", timeout=5).status_code == 200
        slow.close()
