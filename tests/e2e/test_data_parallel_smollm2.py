"""`lmforge serve --data-parallel-size 2` on the real SmolLM2 (fp32, one thread per replica), driven by the official
openai client: 64 concurrent chat requests get one replica's greedy answers, both replicas serve, and requests that
share a long prompt prefix land on one replica (its prefix-cache hits show it)."""

import asyncio

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.test_serve_smollm2 import NAME, LiveServer, openai

pytestmark = pytest.mark.e2e
QUESTIONS = [f"In one sentence, what is {topic}?" for topic in
             ("rain", "a planet", "music", "a cat", "the sea", "bread", "a river", "snow")]
SYSTEM = ("You are a careful assistant for a museum of natural history. " * 12).strip()  # ~130 tokens shared


async def ask(url: str, messages_list: list[list[dict]]) -> list[str]:
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300) as client:
        async def one(messages):
            r = await client.chat.completions.create(model=NAME, messages=messages, max_tokens=24, temperature=0)
            return r.choices[0].message.content
        return await asyncio.gather(*(one(m) for m in messages_list))


def per_engine(url: str, name: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=30).text
    return {s.labels.get("engine", "only"): s.value for f in text_string_to_metric_families(text)
            for s in f.samples if s.name == name}


def test_two_replicas_answer_as_one_and_keep_a_shared_prefix_on_one_replica(smollm2_dir):
    requests = [[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)] + f" ({i})"}] for i in range(64)]
    env = {"OMP_NUM_THREADS": "1"}
    one = LiveServer(smollm2_dir, env=env)
    try:
        want = asyncio.run(ask(one.url, requests))
    finally:
        assert one.stop() == 0
    two = LiveServer(smollm2_dir, "--data-parallel-size", "2", env=env)
    try:
        got = asyncio.run(ask(two.url, requests))
        steps = per_engine(two.url, "lmforge:engine_steps_total")
        hits_before = per_engine(two.url, "lmforge:prefix_cache_hits_total")
        for q in QUESTIONS[:6]:  # one after another: each finds the system prompt's blocks where the first left them
            asyncio.run(ask(two.url, [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]]))
        hits = per_engine(two.url, "lmforge:prefix_cache_hits_total")
    finally:
        assert two.stop() == 0, "".join(two.log)[-3000:]
    assert got == want
    assert steps["0"] > 0 and steps["1"] > 0 and steps["sum"] == steps["0"] + steps["1"]
    gained = {e: hits[e] - hits_before[e] for e in ("0", "1")}
    assert max(gained.values()) >= 5 * 112 and min(gained.values()) == 0, gained  # 5 repeats of >= 7 blocks of 16
