"""Tensor parallelism on the real SmolLM2-135M-Instruct (fp32): 2 processes of 1 thread give, token for token, the
greedy output of one process for 32 chat prompts x 64 tokens (SmolLM2's 3 KV heads split unevenly: 2 and 1), each
rank reading only its slices of the checkpoint; a
worker killed while `lmforge serve` streams stops the server with an error naming it."""

import os
import signal
import time
from pathlib import Path

import pytest
import torch

from lmforge import LLM, SamplingParams
from tests.e2e.test_engine_smollm2 import chat_prompts
from tests.e2e.test_serve_smollm2 import NAME, LiveServer, openai

pytestmark = pytest.mark.e2e


def test_two_ranks_give_one_process_greedy_tokens(smollm2_dir):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
        one = LLM(str(smollm2_dir), dtype="float32", max_model_len=1024, kv_cache_memory=0.5)
        prompts = chat_prompts(one)
        assert len(prompts) == 32
        want = [o.outputs[0].token_ids for o in one.generate(prompts, params, use_tqdm=False)]
        del one
        two = LLM(str(smollm2_dir), dtype="float32", max_model_len=1024, kv_cache_memory=0.5, tensor_parallel_size=2)
        try:
            got = [o.outputs[0].token_ids for o in two.generate(prompts, params, use_tqdm=False)]
            read = [rank["read"] for rank in two.engine.tp_workers.holdings(two.engine.model, two.engine.runner)]
        finally:
            two.engine.shutdown()
    finally:
        torch.set_num_threads(threads)
    # each rank read only its slices of the checkpoint: about half each (3 KV heads split 2 / 1), once in all
    checkpoint = sum(f.stat().st_size for f in Path(smollm2_dir).glob("*.safetensors"))
    assert max(read) < 0.56 * checkpoint and sum(read) < 1.01 * checkpoint, (read, checkpoint)
    differ = [i for i, (g, w) in enumerate(zip(got, want, strict=True)) if g != w]
    assert not differ, f"{len(differ)} prompts differ, e.g. prompt {differ[0] if differ else None}"


def test_a_worker_killed_mid_stream_stops_the_server_naming_its_rank(smollm2_dir):
    """The stream in flight ends with an error, the health check turns 503, and `lmforge serve` exits non-zero
    within 10 s with the rank in its log."""
    server = LiveServer(smollm2_dir, "--tensor-parallel-size", "2", env={"OMP_NUM_THREADS": "1"})
    try:
        children = [int(pid) for task in Path(f"/proc/{server.proc.pid}/task").iterdir()
                    for pid in (task / "children").read_text().split()]  # the engine thread started the worker
        worker = next(pid for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes())
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        stream = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Count to 100."}],
                                                max_tokens=400, temperature=0, stream=True,
                                                extra_body={"ignore_eos": True})
        chunks = 0
        with pytest.raises(openai.APIError):
            for _ in stream:
                chunks += 1
                if chunks == 3:
                    os.kill(worker, signal.SIGKILL)
        assert 3 <= chunks < 400
        start = time.monotonic()
        code = server.proc.wait(timeout=10)
        assert code != 0 and time.monotonic() - start < 10
        log = "".join(server.log)
        assert "tensor parallel worker rank 1 (exit code -9) died" in log, log[-2000:]
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
