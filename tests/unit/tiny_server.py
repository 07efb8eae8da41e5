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


def tiny_chat_model(path: Path, tied: bool = False) -> Path:
    llama_style_dir(path)
    write_tiny(path, {**TINY_LLAMA, "vocab_size": VOCAB, "max_position_embeddings": MAX_MODEL_LEN,
                      "tie_word_embeddings": tied})
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


class LiveApp:
    """The app served by lmforge's uvicorn setup (lmforge/serve/server.py) on 127.0.0.1 from a thread of its own,
    for what an in-process transport cannot show: streams arriving chunk by chunk, connections, shutdown."""

    def __init__(self, app, header_timeout: float = 10.0, shutdown_timeout: float = 30.0):
        import socket
        import threading

        from lmforge.serve.server import serve, uvicorn_server

        self.server = uvicorn_server(app, header_timeout=header_timeout, shutdown_timeout=shutdown_timeout,
                                     access_log=False)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=lambda: asyncio.run(serve(self.server, sock, shutdown_timeout)),
                                       daemon=True)
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                break
            self.thread.join(0.05)

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the server did not stop"

    def __enter__(self) -> "LiveApp":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
