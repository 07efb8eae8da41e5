"""`lmforge serve --lora` on the real SmolLM2 (fp32), live, driven by the official openai client: /v1/models lists the
adapters under the base, requests routed to each adapter (concurrently, in shared batches) give PEFT's merged greedy
output, and /v1/load_lora_adapter / /v1/unload_lora_adapter change the set while the server keeps serving."""

import asyncio

import httpx
import pytest

from lmforge.tokenizer import Tokenizer
from tests.e2e.smollm2_adapters import NEW_TOKENS, QUESTIONS, chat_prompt, make_adapters, peft_references
from tests.e2e.test_serve_smollm2 import KEY, NAME, LiveServer

openai = pytest.importorskip("openai")
pytest.importorskip("peft")
pytestmark = pytest.mark.e2e
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def adapters(smollm2_dir, tmp_path_factory):
    return make_adapters(smollm2_dir, tmp_path_factory.mktemp("served_adapters"))


@pytest.fixture(scope="module")
def expected(smollm2_dir, adapters):
    """The greedy text of the base model and of each PEFT-merged adapter, per prompt (token ids)."""
    tok = Tokenizer.from_dir(smollm2_dir)
    prompts = [chat_prompt(tok, q) for q in QUESTIONS[:2]]
    refs = peft_references(smollm2_dir, adapters, prompts)
    return prompts, {name: [tok.decode(ids) for ids in outs] for name, outs in refs.items()}


@pytest.fixture(scope="module")
def server(smollm2_dir, adapters):
    live = LiveServer(smollm2_dir, "--lora", f"pirate={adapters['pirate']}", "--max-loras", "2",
                      env={"LMFORGE_API_KEY": KEY, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"})
    yield live
    assert live.stop() == 0, "".join(live.log)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def completion(client, model: str, prompt: list[int]) -> str:
    out = client.completions.create(model=model, prompt=prompt, max_tokens=NEW_TOKENS, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.model == model
    return out.choices[0].text


def post(server, route: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + route, json=body, headers=AUTH, timeout=60)


def assert_error(response: httpx.Response, status: int, param: str | None, words: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    assert words in error["message"] and "\n" not in error["message"], error


def test_models_list_the_adapter_under_the_base(client, server, adapters):
    cards = {m.id: m.model_dump() for m in client.models.list().data}
    assert list(cards) == [NAME, "pirate"]
    assert cards["pirate"]["parent"] == NAME and cards["pirate"]["root"] == str(adapters["pirate"])
    assert cards[NAME]["parent"] is None
    assert "LoRA adapters: pirate" in "".join(server.log)


def test_requests_routed_to_the_adapter_get_its_output(client, expected):
    prompts, texts = expected
    assert completion(client, "pirate", prompts[0]) == texts["pirate"][0]
    assert completion(client, NAME, prompts[0]) == texts[None][0] != texts["pirate"][0]
    chat = client.chat.completions.create(model="pirate", messages=[{"role": "user", "content": QUESTIONS[1]}],
                                          max_tokens=NEW_TOKENS, temperature=0)
    assert chat.model == "pirate" and texts["pirate"][1].startswith(chat.choices[0].message.content)


def test_load_serve_mixed_and_unload_at_run_time(client, server, adapters, expected):
    prompts, texts = expected
    assert_error(post(server, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/no/such/adapter"}),
                 400, "lora_path", "does not name a PEFT LoRA adapter this server can load")
    r = post(server, "/v1/load_lora_adapter", {"lora_name": "poet", "lora_path": str(adapters["poet"])})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'poet' added successfully."
    assert [m.id for m in client.models.list().data] == [NAME, "pirate", "poet"]

    async def concurrently():  # base, pirate and poet requests in flight together: they share batches
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120) as c:
            calls = [c.completions.create(model=model, prompt=p, max_tokens=NEW_TOKENS, temperature=0,
                                          extra_body={"ignore_eos": True})
                     for p in prompts for model in (NAME, "pirate", "poet")]
            return [out.choices[0].text for out in await asyncio.gather(*calls)]

    assert asyncio.run(concurrently()) == [texts[name][i] for i in range(len(prompts))
                                           for name in (None, "pirate", "poet")]
    assert_error(post(server, "/v1/load_lora_adapter", {"lora_name": "third", "lora_path": str(adapters["poet"])}),
                 400, "lora_name", "max_loras=2 adapters are already loaded")
    assert_error(post(server, "/v1/unload_lora_adapter", {"lora_name": "nobody"}), 404, "lora_name",
                 "not a loaded LoRA adapter")
    r = post(server, "/v1/unload_lora_adapter", {"lora_name": "poet"})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'poet' removed successfully."
    with pytest.raises(openai.NotFoundError) as info:
        completion(client, "poet", prompts[0])
    assert info.value.code == "model_not_found"
    assert completion(client, "pirate", prompts[1]) == texts["pirate"][1]  # the rest is served as before
    assert completion(client, NAME, prompts[1]) == texts[None][1]
