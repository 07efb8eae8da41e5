"""`lmforge serve` on the real SmolLM2, live on 127.0.0.1, driven by the official openai client: chat and completions,
streamed and whole, n=2, stops, seeds, logprobs, usage; a disconnect frees its blocks; 64 concurrent streams;
a graceful SIGTERM."""

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

openai = pytest.importorskip("openai")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
KEY = "sk-e2e"
NAME = "smollm2"
QUESTIONS = ["Name a planet.", "What is 2 + 2?", "Say something kind.", "Name a colour.", "What is a cat?",
             "Give me a fruit.", "Name an ocean.", "What is rain?"]


class LiveServer:
    """`python -m lmforge serve` in a subprocess on a free port of 127.0.0.1; its log is kept for assertions."""

    def __init__(self, model_dir: Path, *flags: str, env: dict | None = None):
        cmd = [sys.executable, "-m", "lmforge", "serve", str(model_dir), "--host", "127.0.0.1", "--port", "0",
               "--served-model-name", NAME, "--dtype", "float32", "--max-model-len", "512", "--kv-cache-memory",
               "0.3", "--no-access-log", *flags]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                                     env={**os.environ, **(env or {})})
        self.log: list[str] = []
        deadline, port = time.monotonic() + 180, None
        while port is None:
            line = self.proc.stderr.readline()
            if not line or time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError("server did not start:\n" + "".join(self.log))
            self.log.append(line)
            if m := re.search(r"on http://127\.0\.0\.1:(\d+)/v1", line):
                port = int(m.group(1))
        threading.Thread(target=self._drain, daemon=True).start()
        self.url = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self.log.append(line)

    def metrics(self) -> dict[str, float]:
        samples = {}
        for family in text_string_to_metric_families(httpx.get(self.url + "/metrics", timeout=30).text):
            for s in family.samples:
                reason = s.labels.get("finished_reason")
                samples[s.name + (f"{{{reason}}}" if reason else "")] = s.value
        return samples

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)


@pytest.fixture(scope="module")
def server(smollm2_dir):
    live = LiveServer(smollm2_dir, env={"LMFORGE_API_KEY": KEY})
    yield live
    assert live.stop() == 0, "".join(live.log)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def stream_text(stream) -> tuple[str, str | None, object]:
    """(joined content, finish reason, usage) of a streamed chat completion with one choice."""
    text, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    return "".join(text), finish, usage


def test_models_and_key(server, client):
    assert [m.id for m in client.models.list().data] == [NAME]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", messages=user("hi"), max_tokens=2)
    assert info.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=NAME, messages=user("hi"), temperature=5)
    assert info.value.param == "temperature"


def test_chat_streamed_equals_whole_and_usage(server, client):
    args = dict(model=NAME, messages=user("Name three rivers."), max_tokens=24, temperature=0)
    whole = client.chat.completions.create(**args)
    text, finish, usage = stream_text(client.chat.completions.create(**args, stream=True,
                                                                     stream_options={"include_usage": True}))
    choice = whole.choices[0]
    assert choice.message.content and text == choice.message.content and finish == choice.finish_reason
    prompt_tokens = httpx.post(server.url + "/tokenize", json={"messages": user("Name three rivers.")},  # key: as /v1
                               headers={"Authorization": f"Bearer {KEY}"}).json()["count"]
    assert whole.usage.prompt_tokens == usage.prompt_tokens == prompt_tokens
    assert whole.usage.completion_tokens == usage.completion_tokens <= 24
    assert whole.usage.total_tokens == prompt_tokens + whole.usage.completion_tokens
    assert usage.prompt_tokens_details.cached_tokens > 0  # the second time, the prompt's full blocks were cached


def test_completions_streamed_equals_whole(client):
    args = dict(model=NAME, prompt="The three primary colours are", max_tokens=16, temperature=0)
    whole = client.completions.create(**args)
    chunks = list(client.completions.create(**args, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    ids = client.completions.create(model=NAME, prompt=[[504, 2365]], max_tokens=4, temperature=0)
    assert ids.usage.prompt_tokens == 2 and ids.choices[0].text


def test_stop_strings(client):
    args = dict(model=NAME, prompt="Count: one, two, three, four, five,", max_tokens=20, temperature=0)
    free = client.completions.create(**args).choices[0].text
    stop = free.strip().split()[1]
    cut = client.completions.create(**args, stop=[stop])
    assert cut.choices[0].text == free[: free.index(stop)] and cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].model_extra["stop_reason"] == stop
    streamed = "".join(c.choices[0].text for c in client.completions.create(**args, stop=[stop], stream=True)
                       if c.choices)
    assert streamed == cut.choices[0].text


def test_n2_and_seeded_sampling(client):
    args = dict(model=NAME, messages=user("Write a word."), max_tokens=12, temperature=1.0, seed=7, n=2)
    first, second = (client.chat.completions.create(**args) for _ in range(2))
    texts = [c.message.content for c in first.choices]
    assert len(texts) == 2 and texts == [c.message.content for c in second.choices]
    assert texts[0] != texts[1]  # completion i samples with seed + i
    assert 2 <= first.usage.completion_tokens <= 24


def test_logprobs(client):
    chat = client.chat.completions.create(model=NAME, messages=user("Name a planet."), max_tokens=8, temperature=0,
                                          logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    for token in content:  # greedy: the chosen token is the likeliest
        assert len(token.top_logprobs) == 3 and token.token == token.top_logprobs[0].token
        assert token.logprob == pytest.approx(token.top_logprobs[0].logprob)
        assert token.top_logprobs[0].logprob >= token.top_logprobs[1].logprob >= token.top_logprobs[2].logprob
    text = client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=6, temperature=0, logprobs=2)
    lp = text.choices[0].logprobs
    assert "".join(lp.tokens) == text.choices[0].text and len(lp.top_logprobs) == 6
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]


def test_disconnect_mid_stream_frees_blocks_within_a_step(server):
    body = {"model": NAME, "messages": user("Tell me a long story."), "max_tokens": 400, "ignore_eos": True,
            "stream": True}
    base = server.metrics()
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            seen, lines = 0, response.iter_lines()  # leaving iter_lines early closes the connection
            while seen < 3:
                line = next(lines)
                seen += '"content"' in line and '"role"' not in line
            alive = server.metrics()
            lines.close()
    for _ in range(200):
        after = server.metrics()
        if after["lmforge:kv_cache_usage_perc"] == 0.0 and after["lmforge:num_requests_running"] == 0:
            break
        time.sleep(0.01)
    assert alive["lmforge:num_requests_running"] == 1 and alive["lmforge:kv_cache_usage_perc"] > 0
    assert after["lmforge:kv_cache_usage_perc"] == 0.0 and after["lmforge:num_requests_running"] == 0
    # `alive` was read between two steps; the next one starts at once and may finish before the close reaches the
    # server, but the abort then runs before the step after it: one step to notice, none to free (seen: 1).
    assert after["lmforge:engine_steps_total"] - alive["lmforge:engine_steps_total"] <= 2
    assert after["lmforge:request_success_total{abort}"] - base.get("lmforge:request_success_total{abort}", 0) == 1
    generated = after["lmforge:generation_tokens_total"] - base["lmforge:generation_tokens_total"]
    assert 3 <= generated < 40  # stopped, not run to 400


def test_64_concurrent_streams(server, client):
    references = {q: client.chat.completions.create(model=NAME, messages=user(q), max_tokens=12, temperature=0)
                  .choices[0].message.content for q in QUESTIONS}
    before = server.metrics()

    async def one(aclient, question: str):
        stream = await aclient.chat.completions.create(model=NAME, messages=user(question), max_tokens=12,
                                                       temperature=0, stream=True,
                                                       stream_options={"include_usage": True})
        text, finish, usage = [], None, None
        async for chunk in stream:
            usage = chunk.usage or usage
            for choice in chunk.choices:
                text.append(choice.delta.content or "")
                finish = choice.finish_reason or finish
        return question, "".join(text), finish, usage

    async def main():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=300) as ac:
            return await asyncio.gather(*(one(ac, QUESTIONS[i % len(QUESTIONS)]) for i in range(64)))

    results = asyncio.run(main())
    after = server.metrics()
    assert len(results) == 64
    for question, text, finish, usage in results:
        assert text == references[question] and finish in ("stop", "length") and usage is not None
    finished = sum(after[f"lmforge:request_success_total{{{r}}}"] - before.get(f"lmforge:request_success_total{{{r}}}",
                                                                                0) for r in ("stop", "length"))
    assert finished == 64
    assert after["lmforge:generation_tokens_total"] - before["lmforge:generation_tokens_total"] == sum(
        r[3].completion_tokens for r in results)
    assert after["lmforge:prompt_tokens_total"] - before["lmforge:prompt_tokens_total"] == sum(
        r[3].prompt_tokens for r in results)
    assert after["lmforge:time_to_first_token_seconds_count"] - before["lmforge:time_to_first_token_seconds_count"] \
        == 64
    assert after["lmforge:num_requests_running"] == 0 and after["lmforge:kv_cache_usage_perc"] == 0.0


def test_sigterm_finishes_requests_in_flight_then_exits_cleanly(smollm2_dir):
    live = LiveServer(smollm2_dir, "--shutdown-timeout", "3")
    short = {"model": NAME, "prompt": "Hello", "max_tokens": 8, "ignore_eos": True, "stream": True}
    long = {**short, "max_tokens": 480}
    results: dict[str, list[str]] = {"short": [], "long": []}
    started = threading.Barrier(3)

    def consume(name: str, body: dict) -> None:
        try:
            with httpx.stream("POST", live.url + "/v1/completions", json=body, timeout=60) as response:
                for i, line in enumerate(response.iter_lines()):
                    if i == 0:
                        started.wait()
                    if line:
                        results[name].append(line)
        except httpx.TransportError:  # the server cut the stream at --shutdown-timeout
            results[name].append("cut")

    threads = [threading.Thread(target=consume, args=(n, b)) for n, b in (("short", short), ("long", long))]
    for t in threads:
        t.start()
    started.wait(timeout=60)
    live.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    with pytest.raises(httpx.TransportError):  # no longer accepting
        httpx.get(live.url + "/health", timeout=2)
    for t in threads:
        t.join(60)
    assert live.proc.wait(30) == 0, "".join(live.log)
    assert results["short"][-1] == "data: [DONE]" and '"finish_reason":"length"' in results["short"][-2]
    assert results["long"][-1] == "data: [DONE]"  # cut at --shutdown-timeout: an error event, then [DONE]
    assert '"error"' in results["long"][-2] and "shutting down" in results["long"][-2]
    assert any("server stopped" in line for line in live.log)
    assert not any("Traceback" in line for line in live.log), "".join(live.log)
