"""Data-parallel replicas behind one server (lmforge/engine/data_parallel.py): the router's choices, and a served tiny
model whose two replicas answer concurrent requests with one engine's greedy outputs, with /metrics per replica and
summed."""

import asyncio

import torch
from prometheus_client.parser import text_string_to_metric_families

from lmforge.engine.async_engine import AsyncEngine
from lmforge.engine.config import EngineConfig
from lmforge.engine.data_parallel import DataParallelEngine, PrefixRouter
from lmforge.serve.openai_api import create_app
from tests.unit.tiny_server import chat, request, tiny_chat_model

ENGINE = dict(dtype="float32", kv_cache_memory=0.002, block_size=4)


def test_router_balances_load_and_follows_a_prefix_only_one_replica_has_seen():
    router = PrefixRouter(2, block_size=4)
    assert router.pick(None, [3, 1]) == 1  # no token ids: the least busy
    shared = list(range(100, 140))  # ten blocks
    assert router.pick(shared + [1, 2, 3, 4], [0, 0]) == 0
    assert router.pick(shared + [5, 6, 7, 8], [5, 0]) == 0  # only replica 0 has seen the prefix: it stays there
    assert router.pick(shared + [9, 9, 9, 9], [20, 0]) == 1  # ... unless it is much busier than the least busy
    # now both have seen it: no pull either way, the least busy gets the next one
    assert router.pick(shared + [7, 7, 7, 7], [2, 3]) == 0
    assert router.pick(shared + [8, 8, 8, 8], [3, 2]) == 1
    assert router.pick(list(range(500, 520)), [4, 1]) == 1  # a prompt nobody has seen


def test_two_replicas_serve_one_engines_greedy_outputs_with_metrics_per_replica(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    path = str(tiny_chat_model(tmp_path))
    config = EngineConfig(model=path, **ENGINE)
    bodies = [chat(f"question {i} " * (1 + i % 3), temperature=0, max_tokens=12) for i in range(16)]

    async def answers(engine):
        app = create_app(engine, ["tiny"], ui=False)
        responses = await asyncio.gather(*(request(app, "POST", "/v1/chat/completions", {"model": "tiny", **b})
                                           for b in bodies))
        assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
        metrics = (await request(app, "GET", "/metrics")).text
        return [r.json()["choices"][0]["message"]["content"] for r in responses], metrics

    one = AsyncEngine(config)
    two = DataParallelEngine(config, 2)
    try:
        want, _ = asyncio.run(answers(one))
        got, metrics = asyncio.run(answers(two))
    finally:
        one.shutdown()
        two.shutdown()
        torch.set_num_threads(threads)
    assert got == want
    assert min(two.routed) > 0 and sum(two.routed) == 16  # both replicas served
    steps = {s.labels["engine"]: s.value for f in text_string_to_metric_families(metrics)
             if f.name == "lmforge:engine_steps" for s in f.samples}
    assert set(steps) == {"0", "1", "sum"} and steps["sum"] == steps["0"] + steps["1"] > 0
