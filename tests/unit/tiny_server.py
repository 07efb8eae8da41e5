"""A tiny random chat model served in-process, and a small client for it (helpers for the test_serve_* files).

The model is random, so its text is noise; the tests check shapes, counts, statuses and agreement between paths.
"""

import asyncio
import json
from pathlib import Path

import httpx

from lmforge.engine.async_engine import AsyncEngine
from tests.tiny import TINY_LLAMA, write_tiny
from tests.tokenizer_refs import llama_style_dir

# A template that rejects tool messages, so a template's own refusal can be tested.
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tool messages') }}{% endif %}"
    "<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<s>assistant:{% endif %}"
)
VOCAB = 550  # the Llama-style test tokenizer's size, added tokens included
MAX_MODEL_LEN = 128


def tiny_chat_model(path: Path) -> Path:
    llama_style_dir(path)
    write_tiny(path, {**TINY_LLAMA, "vocab_size": VOCAB, "max_position_embeddings": MAX_MODEL_LEN})
    (path / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return path


def tiny_engine(path: Path) -> AsyncEngine:
    return AsyncEngine(model=str(tiny_chat_model(path)), dtype="float32", kv_cache_memory=0.002, block_size=4)


def run(coro):
    return asyncio.run(coro)


async def request(app, method: str, path: str, body=None, headers: dict | None = None) -> httpx.Response:
    """One request through the ASGI app; `body` is JSON-encoded unless it is already bytes."""
    content = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await client.request(method, path, content=content, headers=headers)


def events(response: httpx.Response) -> list:
    """The server-sent events of a streamed response: parsed JSON objects, then the literal '[DONE]'."""
    out = []
    for block in response.text.split("\n\n"):
        if not block:
            continue
        assert block.startswith("data: "), block
        data = block[len("data: "):]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


def chat(content: str = "hello there", **fields) -> dict:
    return {"messages": [{"role": "user", "content": content}], **fields}
