"""LoRA adapters over HTTP on a tiny random model: /v1/models lists them under the base, a request naming one gets
that adapter's output (the engine's, with the same LoRARequest), and /v1/load_lora_adapter /
/v1/unload_lora_adapter change the set at run time, every refusal in OpenAI's error shape while the server serves on."""

import pytest

from lmforge import AsyncEngine, SamplingParams
from lmforge.engine.lora_manager import LoRARequest
from lmforge.serve.openai_api import create_app
from tests.adapters import save_peft_adapter
from tests.unit.test_serve_api import assert_error
from tests.unit.tiny_server import request, run, tiny_chat_model

pytest.importorskip("peft")

MODEL = "tiny"
LOAD, UNLOAD, COMPLETIONS = "/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/v1/completions"
PROMPT = [5, 17, 33, 2, 90, 41]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_serve")
    base = tiny_chat_model(root / "base")
    save_peft_adapter(base, root / "a", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    save_peft_adapter(base, root / "b", seed=2, r=8, lora_alpha=16, target_modules="all-linear")
    save_peft_adapter(base, root / "c", seed=3, r=4, target_modules=["o_proj"])
    save_peft_adapter(base, root / "rank16", r=16, target_modules=["q_proj"])
    return root


@pytest.fixture(scope="module")
def engine(files):
    eng = AsyncEngine(model=str(files / "base"), dtype="float32", kv_cache_memory=0.002, block_size=4,
                      enable_lora=True, max_loras=2, max_lora_rank=8)
    run(eng.add_lora(LoRARequest("a", 1, str(files / "a"))))  # as `lmforge serve --lora a=...` does before the app
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def app(engine, files):  # adapters under `files` may be loaded at run time, and their refusals say why
    return create_app(engine, [MODEL], model_root=str(files / "base"), allow_runtime_lora_updating=True,
                      allowed_lora_paths=[str(files)])


def complete(app, model: str, **fields):
    body = {"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True, **fields}
    return run(request(app, "POST", COMPLETIONS, body))


def engine_text(engine, lora: LoRARequest | None) -> str:
    async def go():
        params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        async for out in engine.generate(PROMPT, params, f"direct-{lora and lora.lora_name}", lora_request=lora):
            last = out
        return last.outputs[0].text

    return run(go())


def model_ids(app) -> list[str]:
    return [m["id"] for m in run(request(app, "GET", "/v1/models")).json()["data"]]


def test_models_list_the_base_and_its_adapters(app, files):
    cards = run(request(app, "GET", "/v1/models")).json()["data"]
    assert [(c["id"], c["parent"], c["root"]) for c in cards] == [(MODEL, None, str(files / "base")),
                                                                   ("a", MODEL, str(files / "a"))]
    assert run(request(app, "GET", "/v1/models/a")).json()["parent"] == MODEL


def test_a_request_naming_an_adapter_gets_its_output(app, engine, files):
    r = complete(app, "a")
    assert r.status_code == 200 and r.json()["model"] == "a"
    adapted = r.json()["choices"][0]["text"]
    assert adapted == engine_text(engine, LoRARequest("a", 1, str(files / "a")))
    base = complete(app, MODEL).json()["choices"][0]["text"]
    assert base == engine_text(engine, None) and base != adapted
    chat = run(request(app, "POST", "/v1/chat/completions", {"model": "a", "max_tokens": 4,
                                                               "messages": [{"role": "user", "content": "hi"}]}))
    assert chat.status_code == 200 and chat.json()["model"] == "a"
    assert 'lmforge:lora_requests_total{lora_name="a",model_name="tiny"}' in run(request(app, "GET", "/metrics")).text


def test_load_and_unload_at_run_time(app, engine, files):
    def load(name, path):
        return run(request(app, "POST", LOAD, {"lora_name": name, "lora_path": str(path)}))

    def unload(name):
        return run(request(app, "POST", UNLOAD, {"lora_name": name}))

    before = complete(app, "a").json()["choices"][0]["text"]
    assert_error(load("big", files / "rank16"), 400, "lora_path", "r = 16 exceeds the engine's max_lora_rank=8")
    assert_error(load("nope", files / "missing"), 400, "lora_path", "not found")
    assert_error(load("a", files / "b"), 400, "lora_name", "already loaded")
    assert_error(load(MODEL, files / "b"), 400, "lora_name", "is the base model")
    assert_error(run(request(app, "POST", LOAD, {"lora_name": "x"})), 400, "lora_path", "Missing required parameter")
    r = load("b", files / "b")
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'b' added successfully."
    assert model_ids(app) == [MODEL, "a", "b"]
    b_text = complete(app, "b").json()["choices"][0]["text"]
    assert b_text == engine_text(engine, engine.engine.loras.get("b").request) and b_text != before
    assert_error(load("c", files / "c"), 400, "lora_name", "max_loras=2 adapters are already loaded")

    async def unload_while_in_flight():
        state = app.state.lmforge
        params = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
        sub = await state.submit([PROMPT], params, "held", state.models.resolve("b"), 0.0, "prompt")
        try:
            return await request(app, "POST", UNLOAD, {"lora_name": "b"})
        finally:
            sub.close()

    assert_error(run(unload_while_in_flight()), 409, "lora_name", "requests in flight")
    assert model_ids(app) == [MODEL, "a", "b"]  # refused: still served
    assert_error(unload("zzz"), 404, "lora_name", "not a loaded LoRA adapter")
    assert_error(unload(MODEL), 400, "lora_name", "the base model, not an adapter")
    r = unload("b")
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'b' removed successfully."
    assert model_ids(app) == [MODEL, "a"]
    assert_error(complete(app, "b"), 404, "model", "does not exist")
    assert load("c", files / "c").status_code == 200  # the freed slot takes another adapter
    c_text = complete(app, "c").json()["choices"][0]["text"]
    assert c_text == engine_text(engine, engine.engine.loras.get("c").request)
    assert complete(app, "a").json()["choices"][0]["text"] == before  # the others served as before
    assert unload("c").status_code == 200


def test_a_server_without_lora_refuses_the_endpoints(files):
    plain = AsyncEngine(model=str(files / "base"), dtype="float32", kv_cache_memory=0.002, block_size=4)
    try:
        app = create_app(plain, [MODEL], allow_runtime_lora_updating=True)
        r = run(request(app, "POST", LOAD, {"lora_name": "a", "lora_path": str(files / "a")}))
        assert_error(r, 400, None, "start it with --enable-lora")
        assert model_ids(app) == [MODEL]
    finally:
        plain.shutdown()
