"""The playground on a server with a reasoning parser, in headless Chromium: the model's thinking
(`reasoning_content`) is shown folded above the reply and equals the API's for the same temperature-0 request. The
model is the tiny random chat model with SmolLM2's tokenizer plus <think> / </think> tokens: under `deepseek_r1` (the
template opens the thinking) its output before any </think> is reasoning."""

import shutil

import httpx
from tokenizers import AddedToken, Tokenizer

from tests.browser import LAPTOP, Console, LmforgeChild, launch_chromium
from tests.tiny import TINY_LLAMA, write_tiny

QUESTION = "Why is the sky blue?"


def thinking_model(tiny_chat_model, path):
    shutil.copytree(tiny_chat_model, path)
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    tokenizer.add_tokens([AddedToken("<think>", special=False), AddedToken("</think>", special=False)])
    tokenizer.save(str(path / "tokenizer.json"))
    write_tiny(path, {**TINY_LLAMA, "vocab_size": tokenizer.get_vocab_size(), "max_position_embeddings": 512})
    return path


def test_the_models_thinking_is_shown_apart_from_its_reply(tiny_chat_model, tmp_path):
    playwright, browser = launch_chromium()
    server = None
    try:
        model = thinking_model(tiny_chat_model, tmp_path / "model")
        server = LmforgeChild(["serve", str(model), "--reasoning-parser", "deepseek_r1", "--port", "0", "--dtype",
                               "float32", "--max-model-len", "128", "--kv-cache-memory", "0.01", "--no-access-log"],
                              r"chat playground on (http://127\.0\.0\.1:\d+)/")
        page = browser.new_page(viewport=LAPTOP)
        console = Console(page)
        page.goto(server.url + "/")
        page.wait_for_selector("#model option", state="attached")
        page.fill("#temperature", "0")
        page.fill("#max-tokens", "12")
        page.fill("#prompt", QUESTION)
        page.press("#prompt", "Enter")
        page.wait_for_selector(".message.assistant[data-state=done]", timeout=60_000)
        answer = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": QUESTION}], "temperature": 0, "top_p": 1, "max_tokens": 12,
        }).json()["choices"][0]["message"]
        assert answer["reasoning_content"], answer  # the case under test: the model thought
        reply = page.locator(".message.assistant")
        assert reply.locator(".thinking summary").text_content() == "Thinking"
        assert reply.locator(".reasoning").text_content() == answer["reasoning_content"]
        assert reply.locator(".content").text_content() == (answer["content"] or "")
        console.assert_clean()
    finally:
        browser.close()
        playwright.stop()
        stopped = server.stop() if server else None
    assert stopped == 0, "".join(server.log)
