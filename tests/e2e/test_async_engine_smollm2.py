"""AsyncEngine on the real model: streams equal offline results, the loop stays responsive, leaving a stream
early frees its blocks, bad input fails before queueing."""

import asyncio

import pytest

from lmforge import AsyncEngine, SamplingParams

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def engine(smollm2_dir):
    eng = AsyncEngine(model=str(smollm2_dir), dtype="float32", max_model_len=512, kv_cache_memory=0.2)
    yield eng
    eng.shutdown()


def prompts(engine) -> list[list[int]]:
    tok = engine.tokenizer
    return [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)
            for q in ("Name a planet.", "What is 2 + 2?", "Say something kind.")]


async def collect(engine, prompt, params, request_id):
    pieces, last = [], None
    async for out in engine.generate(prompt, params, request_id):
        pieces.append(out.new_text[0])
        last = out
    return "".join(pieces), last


def test_concurrent_streams_match_final_text_and_loop_stays_free(engine):
    params = SamplingParams(temperature=0, max_tokens=24)

    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.005)
                ticks += 1

        tick_task = asyncio.create_task(ticker())
        results = await asyncio.gather(*(collect(engine, p, params, f"s{i}") for i, p in enumerate(prompts(engine))))
        tick_task.cancel()
        return results, ticks

    results, ticks = asyncio.run(main())
    for streamed, last in results:
        assert last.finished and streamed == last.outputs[0].text and streamed
    assert ticks > 10  # the event loop kept running while the model stepped


def test_leaving_a_stream_aborts_and_frees_blocks(engine):
    async def main():
        async for out in engine.generate(prompts(engine)[0], SamplingParams(max_tokens=200, ignore_eos=True), "gone"):
            if len(out.outputs[0].token_ids) >= 3:
                break  # the client disconnects
        bm = engine.engine.block_manager
        for _ in range(100):
            state = await engine.run(lambda: (bm.num_free_blocks, bm.num_blocks, engine.engine.requests.copy()))
            if state[0] == state[1]:
                return state
            await asyncio.sleep(0.01)
        return state

    free, total, requests = asyncio.run(main())
    assert free == total and "gone" not in requests


def test_invalid_request_raises_before_queueing(engine):
    async def main():
        with pytest.raises(ValueError, match="outside the vocabulary"):
            async for _ in engine.generate([1, 10**8], SamplingParams(), "bad"):
                pass
        return await collect(engine, prompts(engine)[1], SamplingParams(temperature=0, max_tokens=8), "good")

    text, last = asyncio.run(main())
    assert last.finished and text
