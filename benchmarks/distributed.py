"""Distributed training on one CPU machine: 2 processes x 1 thread vs 1 process x 2 threads, and memory per strategy
(issue 6).

Usage: python benchmarks/distributed.py [--steps 8] [--methods lora,full] [--out results.json] [--keep]
About 15 minutes on the 2-core CI machine (9 runs).

Setup: the model, data and training settings of benchmarks/train.py (SmolLM2-135M-Instruct, rows of 512 tokens of
stdlib docstrings, 8 rows per optimizer step, bf16-mixed, LoRA rank 8 on q/k/v/o or full fine-tuning, AdamW,
constant lr, no evaluation or checkpoints), run by `lmforge train CONFIG --nproc N` (torchrun, gloo) for N = 2 and
plain `lmforge train CONFIG` for N = 1. One process uses 2 threads; two processes use 1 thread each
(OMP_NUM_THREADS=1 and `threads: 1`), so both layouts use the machine's 2 cores. With 2 processes each rank runs
micro-batch 4 x accumulation 1; alone, micro-batch 4 x accumulation 2: the same 8 rows per step.

Measured, per run: tokens/s = trained tokens (all ranks) over the wall time of the steps after the first 2
(warm-up), from rank 0's metrics.jsonl; weights (parameters and buffers) and optimizer state per rank from
RUN/memory.json (after the first step: the bytes of the rank's own tensors, its shards under FSDP); peak RSS =
ru_maxrss of the largest process of the run (the launcher's RUSAGE_CHILDREN covers torchrun and both ranks; the
ranks are alike, so this is one rank's peak). Ratios are against the 1 process x 2 threads run of the same method.
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import train as shared  # noqa: E402  (benchmarks/train.py: data, the lmforge config, the child runner)

LAYOUTS = [  # (name, processes, threads per process, config overrides)
    ("1 process x 2 threads", 1, 2, {}),
    ("2 x 1, DDP", 2, 1, {"strategy": "ddp"}),
    ("2 x 1, FSDP shard full", 2, 1, {"strategy": "fsdp", "shard": "full"}),
    ("2 x 1, FSDP shard grad_op", 2, 1, {"strategy": "fsdp", "shard": "grad_op"}),
    ("2 x 1, FSDP full + activation ckpt", 2, 1, {"strategy": "fsdp", "shard": "full", "ac": True}),
    ("1 x 2 + activation ckpt", 1, 2, {"ac": True}),
]
FOR = {"lora": [0, 1, 2], "full": [0, 1, 2, 3, 4, 5]}


def command(method: str, a, d: Path, processes: int, threads: int, extra: dict) -> list[str]:
    a.threads = threads
    cmd = shared.lmforge_command(method, a, d)
    config = yaml.safe_load((d / "config.yaml").read_text())
    config["activation_checkpointing"] = bool(extra.get("ac"))
    config["distributed"] = {k: v for k, v in extra.items() if k in ("strategy", "shard")} or {"strategy": "auto"}
    (d / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return cmd + (["--nproc", str(processes)] if processes > 1 else [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per run (the first 2 are warm-up)")
    parser.add_argument("--methods", default="lora,full")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    from lmforge.tokenizer import Tokenizer

    code = "from lmforge.weights.resolve import resolve_model; print(resolve_model('smollm2-135m', progress=False))"
    args.model_dir = Path(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                         check=True).stdout.strip().splitlines()[-1])
    work = Path(tempfile.mkdtemp(prefix="lmforge-bench-dist-"))
    rows = args.steps * shared.MICRO_BATCH * shared.ACCUMULATION
    args.texts, _, data_info = shared.build_data(Tokenizer.from_dir(args.model_dir), rows, work)
    versions = common.versions(shared.PEER_PACKAGES)
    print(f"CPU: {common.cpu_name()}; versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()
                                                               if k in ("lmforge", "torch")))
    print(f"data: {data_info}; 8 rows of 512 tokens per step, {args.steps} steps, bf16-mixed; tokens/s over steps "
          f"{shared.WARMUP_STEPS + 1}-{args.steps}", flush=True)
    results = []
    for method in args.methods.split(","):
        for index in FOR[method]:
            name, processes, threads, extra = LAYOUTS[index]
            d = work / f"{method}-{index}"
            d.mkdir()
            run = shared.Run("lmforge", method)
            print(f"{method}, {name}: running ...", flush=True)
            shared.run_child(run, command(method, args, d, processes, threads, extra), d, threads, args.timeout)
            memory = json.loads((d / "out" / "memory.json").read_text()) if (d / "out" / "memory.json").is_file() \
                else {"ranks": [{}]}
            rank0 = memory["ranks"][0]
            result = {"method": method, "layout": name, "processes": processes, "threads": threads,
                      "strategy": memory.get("strategy"), "note": run.note, "peak_rss_bytes": run.peak_rss,
                      "tokens_per_second": run.tokens_per_second() if run.ok else None,
                      "weight_bytes": rank0.get("weight_bytes"), "optimizer_bytes": rank0.get("optimizer_bytes"),
                      "losses": run.losses() if run.ok else [], "others_cpu_share": run.others}
            results.append(result)
            status = run.note or f"{result['tokens_per_second']:.1f} tokens/s, peak RSS {run.peak_rss / 2**30:.2f} GiB"
            print(f"  {status} [{run.wall:.0f} s; other processes used {run.others:.0%} of the CPUs]", flush=True)

    gib = 2**30
    for method in args.methods.split(","):
        rows = [r for r in results if r["method"] == method]
        base = rows[0]["tokens_per_second"] or float("nan")
        print(f"\n{method}\n| layout | strategy | tokens/s | vs 1x2 | weights / rank GiB | optimizer / rank GiB "
              "| peak RSS / process GiB |\n|---|---|---:|---:|---:|---:|---:|")
        for r in rows:
            if r["note"]:
                print(f"| {r['layout']} | – | {r['note']} | | | | |")
                continue
            print(f"| {r['layout']} | {r['strategy']} | {r['tokens_per_second']:.1f} | "
                  f"{r['tokens_per_second'] / base:.2f} | {r['weight_bytes'] / gib:.3f} | "
                  f"{r['optimizer_bytes'] / gib:.3f} | {r['peak_rss_bytes'] / gib:.2f} |")
        first = rows[0]["losses"]
        for r in rows[1:]:
            if r["losses"] and first:
                gap = max(abs(x - y) for x, y in zip(r["losses"], first, strict=False))
                print(f"  {r['layout']}: largest per-step loss difference from 1x2: {gap:.4f} (bf16)")
    if args.out:
        args.out.write_text(json.dumps({"data": data_info, "steps": args.steps, "runs": results}, indent=1))
        print(f"\nwrote {args.out}")
    if args.keep or any(r["note"] for r in results):
        print(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
