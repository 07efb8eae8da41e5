"""Tensor parallelism on one CPU machine (issue 22): 2 processes x 1 thread (TP=2) against 1 process x 2 threads (TP=1),
same model, same requests, one run; and what the collectives cost per step as the model widens.

    python benchmarks/tensor_parallel.py [--models smollm2,wide] [--num-prompts 32] [--max-tokens 64]
                                          [--single-tokens 128] [--dtype auto] [--repeats 2]

Models: `smollm2` (SmolLM2-135M-Instruct, hidden 576) and `wide` (random weights of a Llama with hidden 2048,
intermediate 5632, 16 heads / 8 KV heads, 8 layers, SmolLM2's vocabulary and tokenizer; written once under
~/.cache/lmforge/bench). Each system runs in a process of its own (greedy, EOS ignored, best of --repeats after a
warm-up call): offline throughput (--num-prompts prompts x --max-tokens tokens, output tok/s) and single-stream decode
(--single-tokens tokens, tok/s). For TP=2 the collectives (all-reduce, all-gather) are timed on rank 0 during the
single stream: "comm ms/step" is their time per decode step, waiting for the other rank included. Data-parallel
replicas (--data-parallel-size) are not built, so there is no DP row.
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


def run_system(job: dict) -> dict:
    """In its own process: one LLM (TP=job['tp'] with job['threads'] threads per process), both workloads."""
    import torch

    torch.set_num_threads(job["threads"])
    from lmforge import LLM, SamplingParams
    from lmforge.engine import tensor_parallel

    llm = LLM(job["model"], dtype=job["dtype"], kv_cache_memory=2, max_model_len=1024,
              tensor_parallel_size=job["tp"], enable_prefix_caching=False)
    prompts = [[1 + (17 * i + 5 * j) % 4000 for j in range(32 + i % 16)] for i in range(job["num_prompts"])]
    out = {}
    many = SamplingParams(temperature=0, max_tokens=job["max_tokens"], ignore_eos=True)
    seconds = common.best_of(lambda: llm.generate(prompts, many, use_tqdm=False), job["repeats"])
    out["throughput"] = job["num_prompts"] * job["max_tokens"] / seconds
    one = SamplingParams(temperature=0, max_tokens=job["single_tokens"], ignore_eos=True)
    seconds = common.best_of(lambda: llm.generate([prompts[0]], one, use_tqdm=False), job["repeats"])
    out["decode"] = job["single_tokens"] / seconds
    if job["tp"] > 1:  # the collectives' share of a single-stream step, timed on rank 0
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
        for tp, threads in ((1, 2), (2, 1)):
            job = dict(model=path, tp=tp, threads=threads, dtype=args.dtype, num_prompts=args.num_prompts,
                       max_tokens=args.max_tokens, single_tokens=args.single_tokens, repeats=args.repeats)
            with common.Stopwatch() as watch:
                results[tp] = common.run_worker([sys.executable, __file__, "--run", json.dumps(job)], {}, MARKER)
            print(f"  {name} TP={tp} x {threads} thread(s): {json.dumps(results[tp])}; {watch.note()}", flush=True)
        one, two = results[1], results[2]
        rows.append([f"{name} 1 proc x 2 threads", f"{one['throughput']:.1f}", f"{one['decode']:.1f}", "-", "-",
                     f"{one['weight_mib']:.0f}"])
        speedup = two["throughput"] / one["throughput"]
        rows.append([f"{name} TP=2 x 1 thread", f"{two['throughput']:.1f} ({speedup:.2f}x)",
                     f"{two['decode']:.1f} ({two['decode'] / one['decode']:.2f}x)", f"{two['comm_ms']:.2f}",
                     f"{two['comm_ms'] / two['step_ms']:.0%}", f"{two['weight_mib']:.0f}"])
    common.print_table(["system", "throughput tok/s", "decode tok/s", "comm ms/step", "comm share",
                        "rank 0 weights MiB"], rows)


if __name__ == "__main__":
    main()
