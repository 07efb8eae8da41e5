"""/metrics: Prometheus text with vLLM's names under `lmforge:`, counters that add up to what the responses said,
and an aborted request counted as such with its blocks back in the pool."""

import asyncio
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lmforge.serve.inputs import sampling_params
from lmforge.serve.openai_api import create_app
from lmforge.serve.protocol import ChatCompletionRequest
from lmforge.serve.state import ServerState
from tests.unit.tiny_server import chat, request, run, tiny_engine

EXPECTED = {  # name -> type, as scraped (counters without their _total suffix)
    "lmforge:num_requests_running": "gauge", "lmforge:num_requests_waiting": "gauge",
    "lmforge:kv_cache_usage_perc": "gauge", "lmforge:kv_cache_blocks": "gauge",
    "lmforge:prefix_cache_hit_rate": "gauge",
    "lmforge:prefix_cache_queries": "counter", "lmforge:prefix_cache_hits": "counter",
    "lmforge:num_preemptions": "counter", "lmforge:engine_steps": "counter", "lmforge:prompt_tokens": "counter",
    "lmforge:generation_tokens": "counter", "lmforge:request_success": "counter", "lmforge:request_rejected": "counter",
    "lmforge:time_to_first_token_seconds": "histogram", "lmforge:inter_token_latency_seconds": "histogram",
    "lmforge:e2e_request_latency_seconds": "histogram", "lmforge:request_queue_time_seconds": "histogram",
    "lmforge:request_prompt_tokens": "histogram", "lmforge:request_generation_tokens": "histogram",
}


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    eng = tiny_engine(tmp_path_factory.mktemp("tiny_chat"))
    yield eng
    eng.shutdown()


def scrape(app) -> dict[str, float]:
    """{'name{label=value,...}': value} for every sample, labels sorted (model_name left out)."""
    response = run(request(app, "GET", "/metrics"))
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "model_name")
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return samples


def test_names_types_and_labels(engine):
    app = create_app(engine, ["tiny"])
    run(request(app, "POST", "/v1/chat/completions", chat(max_tokens=2)))
    text = run(request(app, "GET", "/metrics")).text
    families = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert {k: families.get(k) for k in EXPECTED} == EXPECTED
    assert all(name.startswith("lmforge:") for name in families)
    assert 'model_name="tiny"' in text and "_created" not in text


def test_counters_match_the_responses(engine):
    app = create_app(engine, ["tiny"])
    bodies = [chat(f"question {i}", max_tokens=3 + i, ignore_eos=True, n=1 + i % 2) for i in range(5)]
    bodies.append({"prompt": ["a b", [7, 8, 9]], "max_tokens": 4, "ignore_eos": True})

    async def main():
        return await asyncio.gather(*(request(app, "POST", "/v1/completions" if "prompt" in b else
                                              "/v1/chat/completions", b) for b in bodies))

    before = scrape(app)
    usages = [r.json()["usage"] for r in run(main())]
    after = scrape(app)
    completions = sum(1 + i % 2 for i in range(5)) + 2
    assert after["lmforge:prompt_tokens_total"] == sum(u["prompt_tokens"] for u in usages)
    assert after["lmforge:generation_tokens_total"] == sum(u["completion_tokens"] for u in usages)
    assert after["lmforge:request_success_total{finished_reason=length}"] == completions
    assert after["lmforge:e2e_request_latency_seconds_count"] == 7  # engine requests: one per prompt
    assert after["lmforge:time_to_first_token_seconds_count"] == 7
    assert after["lmforge:request_generation_tokens_count"] == completions
    assert after["lmforge:inter_token_latency_seconds_count"] == sum(u["completion_tokens"] for u in usages) \
        - completions  # every token but each completion's first
    assert after["lmforge:engine_steps_total"] > before.get("lmforge:engine_steps_total", 0)
    assert after["lmforge:prefix_cache_queries_total"] >= sum(u["prompt_tokens"] for u in usages)
    assert after["lmforge:num_requests_running"] == after["lmforge:num_requests_waiting"] == 0
    assert after["lmforge:kv_cache_usage_perc"] == 0.0


def test_a_request_closed_early_is_an_abort_and_frees_its_blocks(engine):
    app = create_app(engine, ["tiny"])
    state: ServerState = app.state.lmforge
    req = ChatCompletionRequest.model_validate(chat(max_tokens=100, ignore_eos=True))

    async def main():
        ids = engine.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], True, tokenize=True)
        params = sampling_params(req, 100, None, state.vocab_size)
        sub = await state.submit([ids], params, "early", state.models.default, time.monotonic(), "messages")
        async for _, out in sub.outputs():
            if len(out.outputs[0].token_ids) >= 3:
                break
        in_use = await engine.run(lambda: engine.engine.block_manager.usage)
        sub.close()
        return in_use

    assert run(main()) > 0
    after = scrape(app)
    assert after["lmforge:request_success_total{finished_reason=abort}"] == 1
    assert after["lmforge:kv_cache_usage_perc"] == 0.0 and after["lmforge:num_requests_running"] == 0
    assert 3 <= after["lmforge:generation_tokens_total"] < 100
