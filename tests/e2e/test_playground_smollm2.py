"""The chat playground of a live `lmforge serve` on the real SmolLM2 (API key on, one LoRA adapter), in headless
Chromium: the key is asked for and a wrong one shows the server's message; a reply grows while it streams and equals
the API's text for the same temperature-0 request (base model, the adapter, a JSON schema); regenerate; stop frees
the request on the server; keyboard only; phone width; no console errors. Screenshots land in $LMFORGE_SCREENSHOTS
(docs/img for the README) or the test's temporary directory."""

import json
import time

import httpx
import pytest

from tests.browser import LAPTOP, PHONE, Console, launch_chromium, overflowing, screenshot
from tests.e2e.smollm2_adapters import make_adapters
from tests.e2e.test_serve_smollm2 import KEY, NAME, LiveServer

pytest.importorskip("peft")
pytestmark = pytest.mark.e2e
QUESTION = "What is the capital of France? Answer in one sentence."
UNAUTHORIZED = r"Failed to load resource: the server responded with a status of 401 \(Unauthorized\)"
SCHEMA = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}


@pytest.fixture(scope="module")
def server(smollm2_dir, tmp_path_factory):
    adapters = make_adapters(smollm2_dir, tmp_path_factory.mktemp("playground_adapters"))
    live = LiveServer(smollm2_dir, "--lora", f"pirate={adapters['pirate']}", env={"LMFORGE_API_KEY": KEY})
    yield live
    assert live.stop() == 0, "".join(live.log)


@pytest.fixture(scope="module")
def browser():
    playwright, chromium = launch_chromium()
    yield chromium
    chromium.close()
    playwright.stop()


@pytest.fixture
def page(browser, server):
    """The playground in a fresh tab (its own session storage), the key entered."""
    context = browser.new_context(viewport=LAPTOP)
    tab = context.new_page()
    tab.console = Console(tab)
    tab.goto(server.url + "/")
    enter_key(tab, KEY)
    tab.wait_for_selector(f"#model option[value='{NAME}']", state="attached")
    tab.console.assert_clean(expected=UNAUTHORIZED)  # the browser's line for the first, keyless /v1/models
    tab.console.errors.clear()
    yield tab
    context.close()


def enter_key(tab, key: str) -> None:
    tab.wait_for_selector("#key-form", state="visible")
    tab.fill("#api-key", key)
    tab.press("#api-key", "Enter")


def api_error(server, key: str | None) -> str:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.get(server.url + "/v1/models", headers=headers, timeout=30).json()["error"]["message"]


def api_reply(server, model: str, max_tokens: int, **fields) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": QUESTION}], "temperature": 0, "top_p": 1,
            "max_tokens": max_tokens, **fields}
    response = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120,
                          headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 200, response.text
    return response.json()


def ask(page, text: str, max_tokens: int) -> None:
    page.fill("#temperature", "0")
    page.fill("#max-tokens", str(max_tokens))
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")  # Enter sends


def last_reply(page):
    return page.locator(".message.assistant").last


def wait_done(page) -> str:
    page.wait_for_selector(".message.assistant:last-child[data-state=done]", timeout=120_000)
    return last_reply(page).locator(".content").text_content()


RECORD_LENGTHS = """() => {
  window.replyLengths = [];
  new MutationObserver(() => {
    const replies = document.querySelectorAll(".message.assistant .content");
    if (replies.length) window.replyLengths.push(replies[replies.length - 1].textContent.length);
  }).observe(document.getElementById("messages"), {subtree: true, childList: true, characterData: true});
}"""


def test_the_key_is_asked_for_and_a_wrong_one_shows_the_servers_message(browser, server, tmp_path):
    context = browser.new_context(viewport=LAPTOP)
    page = context.new_page()
    console = Console(page)
    page.goto(server.url + "/")
    page.wait_for_selector("#key-form", state="visible")
    assert page.text_content("#error") == api_error(server, None)
    enter_key(page, "sk-wrong")
    page.wait_for_function("() => document.querySelector('#error').textContent.startsWith('Incorrect')")
    assert page.text_content("#error") == api_error(server, "sk-wrong")
    screenshot(page, "playground-key", tmp_path)
    enter_key(page, KEY)
    page.wait_for_selector("#key-form", state="hidden")
    models = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()["data"]
    assert page.eval_on_selector_all("#model option", "o => o.map(x => x.value)") == [m["id"] for m in models]
    assert page.eval_on_selector_all("#model option", "o => o.map(x => x.textContent)") == \
        [NAME, f"pirate (LoRA adapter on {NAME})"]
    assert page.is_hidden("#error")
    console.assert_clean(expected=UNAUTHORIZED)
    assert len(console.errors) == 2  # the two refused /v1/models requests, nothing else
    context.close()


def test_a_streamed_reply_grows_and_equals_the_apis_text(page, server, tmp_path):
    page.evaluate(RECORD_LENGTHS)
    ask(page, QUESTION, 48)
    text = wait_done(page)
    expected = api_reply(server, NAME, 48)
    assert text == expected["choices"][0]["message"]["content"]
    lengths = page.evaluate("window.replyLengths")
    partial = sorted({n for n in lengths if 0 < n < len(text)})
    assert len(partial) >= 2, f"the reply did not grow while streaming: {lengths}"
    usage = expected["usage"]
    stats = last_reply(page).locator(".stats").text_content()
    assert stats.startswith(f"{usage['prompt_tokens']} prompt + {usage['completion_tokens']} completion tokens · "
                            "first token ")
    assert "tokens/s" in stats
    page.click("#regenerate")
    assert wait_done(page) == text  # greedy: the same reply, in place of the first
    assert page.locator(".message.assistant").count() == 1
    screenshot(page, "playground", tmp_path)
    page.set_viewport_size(PHONE)
    assert not overflowing(page)
    screenshot(page, "playground-phone", tmp_path)
    page.console.assert_clean()


def test_a_lora_adapter_and_a_json_schema_are_sent_as_chosen(page, server):
    page.select_option("#model", "pirate")
    ask(page, QUESTION, 24)
    text = wait_done(page)
    assert text == api_reply(server, "pirate", 24)["choices"][0]["message"]["content"]
    assert last_reply(page).locator(".who").text_content() == "pirate"  # the model named in the streamed chunks
    page.click("#clear")
    page.select_option("#model", NAME)
    page.select_option("#format", "json_schema")
    assert page.is_visible("#schema")
    schema_text = page.input_value("#schema")
    assert json.loads(schema_text) == SCHEMA
    page.fill("#schema", "{oops")
    ask(page, QUESTION, 32)
    page.wait_for_selector(".message.assistant[data-state=error]")
    assert page.text_content("#error").startswith("The JSON schema is not valid JSON: ")
    page.fill("#schema", schema_text)
    page.click("#regenerate")  # the failed reply, asked for again with the schema fixed
    text = wait_done(page)
    assert page.locator(".message.assistant").count() == 1
    fmt = {"type": "json_schema", "json_schema": {"name": "playground", "schema": SCHEMA}}
    assert text == api_reply(server, NAME, 32, response_format=fmt)["choices"][0]["message"]["content"]
    assert text.lstrip().startswith("{")
    page.console.assert_clean()


def test_stop_ends_the_request_on_the_server(page, server):
    ask(page, "Write a long story about a dragon who learns to bake bread.", 400)
    page.wait_for_function("() => document.querySelector('.message.assistant .content')?.textContent.length > 0")
    assert server.metrics()["lmforge:num_requests_running"] == 1
    page.keyboard.press("Escape")  # stops, as the Stop button does
    page.wait_for_selector(".message.assistant[data-state=stopped]")
    deadline = time.monotonic() + 10
    while server.metrics()["lmforge:num_requests_running"] != 0:
        assert time.monotonic() < deadline, "the stopped request still runs on the server"
        time.sleep(0.1)
    shown = last_reply(page).locator(".content").text_content()
    time.sleep(0.5)
    assert last_reply(page).locator(".content").text_content() == shown  # nothing arrives after the stop
    assert last_reply(page).locator(".stats").text_content().endswith("finish: stopped")
    assert page.is_enabled("#send") and page.is_disabled("#stop-button")
    page.console.assert_clean()


def test_system_prompt_sampling_settings_and_stop_are_sent(page, server):
    page.fill("#system", "You are a pirate. Answer like one.")
    page.fill("#top-p", "0.9")
    page.fill("#seed", "7")
    page.fill("#stop", "!\nmatey")
    ask(page, QUESTION, 40)
    page.fill("#temperature", "0.9")  # after ask(), which sets 0: sampled, reproducible by the seed
    page.click("#regenerate")
    text = wait_done(page)
    expected = api_reply(server, NAME, 40, temperature=0.9, top_p=0.9, seed=7, stop=["!", "matey"],
                         messages=[{"role": "system", "content": "You are a pirate. Answer like one."},
                                   {"role": "user", "content": QUESTION}])
    assert text == expected["choices"][0]["message"]["content"]
    page.console.assert_clean()


def test_a_refused_request_shows_the_servers_message(page, server):
    ask(page, QUESTION, 100_000)
    page.wait_for_selector(".message.assistant[data-state=error]")
    response = httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                          json={"model": NAME, "messages": [{"role": "user", "content": QUESTION}],
                                "max_tokens": 100_000}, timeout=30)
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert page.text_content("#error") == message
    assert last_reply(page).locator(".content").text_content() == message
    assert page.is_enabled("#send")
    page.fill("#max-tokens", "8")
    page.click("#regenerate")  # a retry replaces the failed reply
    assert wait_done(page) == api_reply(server, NAME, 8)["choices"][0]["message"]["content"]
    assert page.locator(".message.assistant").count() == 1 and page.is_hidden("#error")
    page.console.assert_clean(expected=r"Failed to load resource: the server responded with a status of 400 "
                                       r"\(Bad Request\)")
