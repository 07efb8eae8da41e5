"""Tensor parallelism on one CPU machine (issue 22): 2 processes x 1 thread (TP=2) against 1 process x 2 threads (TP=1),
same model, same requests, one run; and what the collectives cost per step as the model widens.

    python benchmarks/tensor_parallel.py [--models smollm2,wide] [--num-prompts 32] [--max-tokens 64]
                                          [--single-tokens 128] [--dtype auto] [--repeats 2]

Models: `smollm2` (SmolLM2-135M-Instruct, hidden 576) and `wide` (random weights of a Llama with hidden 2048,
intermediate 5632, 16 heads / 8 KV heads, 8 layers, SmolLM2's vocabulary and tokenizer; written once under
~/.cache/lmforge/bench). Each system runs in a process of its own (greedy, EOS ignored, best of --repeats after a
warm-up call): offline throughput (--num-prompts prompts x --max-tokens tokens, output tok/s) and single-stream decode
(--single-tokens tokens, tok/s). For TP=2 the collectives (all-reduce, all-gather) are timed on rank 0 during a
single stream of an engine whose steps run eagerly (step_graphs=False: a replayed step graph holds the layers'
all-reduces in C++, out of Python's sight): "comm ms/step" is their time per decode step, waiting for the other rank
included, and "comm share" its share of that eager step. DP=2: two engine
replicas (DataParallelEngine: threads of one process, as `lmforge serve --data-parallel-size 2` runs them) with every
request in flight at once; a single stream runs on one replica.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import common

MARKER = "TP_RESULT"
WIDE = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048, "intermediate_size": 5632,
        "num_hidden_layers": 8, "num_attention_heads": 16, "num_key_value_heads": 8, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True, "torch_dtype": "float32"}


def model_path(name: str) -> str:
    from lmforge.weights.resolve import resolve_model

    smollm2 = resolve_model("smollm2-135m")
    if name == "smollm2":
        return str(smollm2)
    out = Path.home() / ".cache/lmforge/bench/tp-wide-2048"
    if not (out / "model.safetensors").exists():
        import shutil

        import torch

        from lmforge.models import build_args
        from lmforge.weights.hf_dir import save_model

        config = {**WIDE, "vocab_size": json.loads((smollm2 / "config.json").read_text())["vocab_size"]}
        cls, args = build_args(config)
        torch.manual_seed(0)
        model = cls(args)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02)
        out.mkdir(parents=True, exist_ok=True)
        save_model(model, config, out)
        for f in smollm2.iterdir():
            if "token" in f.name or f.suffix == ".jinja":
                shutil.copy(f, out / f.name)
    return str(out)


def replicas(model: str, dtype: str, size: int):
    """`generate(prompts, params)` over a DataParallelEngine of `size` replicas (threads of this process), all
    requests in flight at once as a server would have them."""
    import asyncio
    import itertools

    from lmforge.engine.config import EngineConfig
    from lmforge.engine.data_parallel import DataParallelEngine

    engine = DataParallelEngine(EngineConfig(model=model, dtype=dtype, kv_cache_memory=2, max_model_len=1024,
                                             enable_prefix_caching=False), size)
    ids = itertools.count()

    async def run(prompts, params):
        streams = [await engine.add_request(p, params, f"r{next(ids)}") for p in prompts]
        for stream in streams:
            async for _ in stream:
                pass

    return engine, lambda prompts, params: asyncio.run(run(prompts, params))


def run_system(job: dict) -> dict:
    """In its own process: one LLM (TP=job['tp'] with job['threads'] threads per process) or job['dp'] replicas,
    both workloads."""
    import torch

    torch.set_num_threads(job["threads"])
    from lmforge import LLM, SamplingParams
    from lmforge.engine import tensor_parallel

    if job["dp"] > 1:
        dp, generate = replicas(job["model"], job["dtype"], job["dp"])
    else:
        llm = LLM(job["model"], dtype=job["dtype"], kv_cache_memory=2, max_model_len=1024,
                  tensor_parallel_size=job["tp"], enable_prefix_caching=False)
        generate = lambda prompts, params: llm.generate(prompts, params, use_tqdm=False)  # noqa: E731
    prompts = [[1 + (17 * i + 5 * j) % 4000 for j in range(32 + i % 16)] for i in range(job["num_prompts"])]
    out = {}
    many = SamplingParams(temperature=0, max_tokens=job["max_tokens"], ignore_eos=True)
    seconds = common.best_of(lambda: generate(prompts, many), job["repeats"])
    out["throughput"] = job["num_prompts"] * job["max_tokens"] / seconds
    one = SamplingParams(temperature=0, max_tokens=job["single_tokens"], ignore_eos=True)
    seconds = common.best_of(lambda: generate([prompts[0]], one), job["repeats"])
    out["decode"] = job["single_tokens"] / seconds
    if job["dp"] > 1:
        out["weight_mib"] = dp.engine.weight_bytes / 2**20
        dp.shutdown()
        return out
    if job["tp"] > 1:  # the collectives' share of an eager single-stream step, timed on rank 0
        llm.engine.shutdown()
        llm = LLM(job["model"], dtype=job["dtype"], kv_cache_memory=2, max_model_len=1024,
                  tensor_parallel_size=job["tp"], enable_prefix_caching=False, step_graphs=False)
        llm.generate([prompts[0]], one, use_tqdm=False)  # warm-up
        spent = [0.0]

        def timed(fn):
            def call(*args, **kwargs):
                start = time.perf_counter()
                result = fn(*args, **kwargs)
                spent[0] += time.perf_counter() - start
                return result
            return call

        tp = tensor_parallel
        originals = tp.all_reduce, tp.all_gather
        tp.all_reduce, tp.all_gather = timed(tp.all_reduce), timed(tp.all_gather)
        steps = llm.engine.num_steps
        start = time.perf_counter()
        llm.generate([prompts[0]], one, use_tqdm=False)
        wall = time.perf_counter() - start
        tp.all_reduce, tp.all_gather = originals
        n = llm.engine.num_steps - steps
        out["comm_ms"] = spent[0] / n * 1e3
        out["step_ms"] = wall / n * 1e3
        llm.engine.shutdown()
    out["weight_mib"] = llm.engine.weight_bytes / 2**20
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2,wide")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--single-tokens", type=int, default=128)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--run", help=argparse.SUPPRESS)  # internal: one system's job, as JSON
    args = parser.parse_args()
    if args.run:
        print(MARKER, json.dumps(run_system(json.loads(args.run))), flush=True)
        return
    print(f"CPU: {common.cpu_name()}; dtype {args.dtype}; throughput {args.num_prompts} x {args.max_tokens}, "
          f"single stream {args.single_tokens} tokens")
    rows = []
    for name in args.models.split(","):
        path = model_path(name)
        results = {}
        systems = {"1 proc x 2 threads": (1, 1, 2), "TP=2 x 1 thread": (2, 1, 1), "DP=2 x 1 thread": (1, 2, 1)}
        for label, (tp, dp, threads) in systems.items():
            job = dict(model=path, tp=tp, dp=dp, threads=threads, dtype=args.dtype, num_prompts=args.num_prompts,
                       max_tokens=args.max_tokens, single_tokens=args.single_tokens, repeats=args.repeats)
            with common.Stopwatch() as watch:
                results[label] = common.run_worker([sys.executable, __file__, "--run", json.dumps(job)], {}, MARKER)
            print(f"  {name} {label}: {json.dumps(results[label])}; {watch.note()}", flush=True)
        base = results["1 proc x 2 threads"]
        for label, r in results.items():
            cells = [f"{r[k]:.1f}" + ("" if r is base else f" ({r[k] / base[k]:.2f}x)")
                     for k in ("throughput", "decode")]
            comm = (f"{r['comm_ms']:.2f}", f"{r['comm_ms'] / r['step_ms']:.0%}") if "comm_ms" in r else ("-", "-")
            rows.append([f"{name} {label}", *cells, *comm, f"{r['weight_mib']:.0f}"])
    common.print_table(["system", "throughput tok/s", "decode tok/s", "comm ms/step", "comm share",
                        "weights MiB per rank/replica"], rows)


if __name__ == "__main__":
    main()
