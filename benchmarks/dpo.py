"""DPO throughput and memory: lmforge vs TRL's DPOTrainer (+ PEFT) vs torchtune, LoRA and full (issue 19).

Usage: python benchmarks/dpo.py [--steps 20] [--methods lora,full] [--systems lmforge,trl,torchtune]
       [--threads 2] [--precision auto] [--out results.json] [--keep]
A smoke run is --steps 3 --systems trl (a few minutes on one core).

Setup. SmolLM2-135M-Instruct as a Hugging Face directory (`resolve_model("smollm2-135m")`, float32 safetensors);
every system loads it. The CPU, the threads and every system's version are printed with the results.
Data: configs/data/pirate_pairs.jsonl (pirate answers chosen over the model's own plain answers; made by
configs/data/make_pirate_pairs.py), used in file order, never shuffled, repeated from the start when a run needs
more pairs than the file holds, so every system sees the same pairs in the same steps. Each sequence is rendered
with the model's chat template (the question as a user turn, the answer as an assistant turn) and cut at 512
tokens (none of the demo pairs is that long). lmforge reads the file (`format: preference`, string prompts);
TRL receives the same pairs as conversations and tokenises them itself; torchtune receives token ids made the way
TRL makes them (`_dpo_peers.py tokenize`), since its recipe has no SmolLM2 tokenizer.
Training: 4 pairs per optimizer step (micro-batch 2 pairs x gradient accumulation 2), `--steps` steps (default
20), DPO sigmoid loss with beta 0.1 (reference: the base model with the adapters off under LoRA, a frozen copy for
full fine-tuning), AdamW (betas 0.9/0.999, eps 1e-8, no weight decay) at a constant learning rate without warm-up,
5e-5 for LoRA and 1e-6 (TRL's default for DPO) for full fine-tuning, no gradient clipping (torchtune's DPO recipe
has none), no activation checkpointing, no evaluation, no checkpoints during the run. LoRA: rank 8, alpha 16,
dropout 0 on q_proj, k_proj, v_proj and o_proj (torchtune: output_proj).
Precision (`--precision`, default auto): bf16 where the CPU computes bfloat16 natively (avx512_bf16 or amx_bf16
in /proc/cpuinfo), else fp32 -- emulated bfloat16 is far slower than float32. fp32: float32 weights and math
everywhere. bf16: lmforge `precision: bf16-mixed`; TRL float32 weights under bfloat16 autocast (bf16=True);
torchtune `dtype: bf16`, which means bfloat16 weights (its recipes have no autocast).
Threads: `--threads` (default 2), as OMP_NUM_THREADS/MKL_NUM_THREADS for every run, torch.set_num_threads in
TRL, `threads:` in lmforge's config.

Trained tokens, counted the same way for every system: the tokens the policy runs its forward pass on, i.e. per
pair len(prompt + chosen) + len(prompt + rejected) after the cut at 512, padding excluded; the reference model's
pass is not counted (every system makes one of the same size). TRL: a forward pre-hook on the policy model sums
the attention mask of the passes that run with gradients (its reference pass runs under no_grad); torchtune: the
dataset counts the rows the recipe fetches; lmforge reports its own count in metrics.jsonl. The harness computes
the expected count per step from the token ids and flags a system whose count differs.

Systems, each run alone in its own process, one after the other:
  lmforge    `lmforge train CONFIG.yaml` with `recipe: dpo`, `preference: {loss: sigmoid, beta: 0.1}`, a
             `format: preference` source and `data.packing: false` (micro_batch_size then counts pairs); reads
             OUTPUT_DIR/metrics.jsonl ("tokens", "seconds", "loss", "rewards/accuracies", ...). Skipped, with the
             reason, while `lmforge config check` rejects that config (the DPO recipe is being built).
  trl        trl.DPOTrainer (+ peft LoraConfig for LoRA), benchmarks/_dpo_peers.py in the peers' venv: float32
             weights, sequential sampling, loss_type sigmoid, max_length 512, gradient_checkpointing off (TRL
             turns it on by default).
  torchtune  `tune run lora_dpo_single_device` (torchtune 0.6.1's own recipe) with a generated YAML: the llama3_2
             LoRA builder with SmolLM2's shape (as benchmarks/train.py), FullModelHFCheckpointer, rlhf.loss.DPOLoss
             (beta 0.1); the dataset, tokenizer stub and metric logger live in _dpo_peers.py / _train_peers.py.
             LoRA only: torchtune's full-parameter DPO recipe, full_dpo_distributed, calls
             init_process_group("cuda:nccl,cpu:gloo"), which a CPU build of torch refuses ("Distributed package
             doesn't have NCCL built in"), so the full rows compare lmforge and TRL. Its DPO metrics are those of
             the step's last micro-batch (the recipe keeps no running mean), its loss the step's mean as everywhere.
  Peers venv: as benchmarks/train.py's docstring (torch pinned in the same pip command), pointed at by
      LMFORGE_PEERS_PYTHON; without it the peers' rows say so.

Measured: per optimizer step, its trained tokens and wall time (data loading included); tokens/s is the sum of
tokens over the sum of seconds, s/step their mean, both over the steps after the first 2 (warm-up). Peak RSS is
the child process's ru_maxrss (os.wait4), start-up included. "acc" is the mean of the logged rewards/accuracies
over the last (up to 5) steps, "margin" the last step's rewards/margins: the runs are short, so these only show
that each system trains; they are no quality comparison. Target of issue 19: lmforge >= 2x the faster peer's
tokens/s at <= 0.6x TRL's peak RSS. The machine may be shared: each run prints the share of CPU time other
processes used meanwhile and is marked disturbed above 5%.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import common
import yaml
from train import (
    LORA,
    SEED,
    SEQ_LEN,
    WARMUP_STEPS,
    Run,
    clean_up,
    model_shape,
    print_window,
    resolve_model,
    run_record,
    run_reported,
)

HERE = Path(__file__).resolve().parent
PAIRS = HERE.parent / "configs" / "data" / "pirate_pairs.jsonl"
LMFORGE_BIN = Path(sys.executable).with_name("lmforge")
MICRO_BATCH, ACCUMULATION, BETA = 2, 2, 0.1  # pairs
LR = {"lora": 5e-5, "full": 1e-6}
SYSTEMS = {"lmforge": "lmforge", "trl": "TRL DPOTrainer", "torchtune": "torchtune"}
METHODS = {"lora": "LoRA", "full": "full fine-tuning"}


def native_bf16() -> bool:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return False
    return bool({"avx512_bf16", "amx_bf16"} & set(flags.split()))


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """The options this benchmark and benchmarks/grpo.py share."""
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                        help="auto: bf16 where the CPU has native bfloat16, else fp32")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per run before it is killed")
    parser.add_argument("--out", type=Path, help="write the results (with every step's metrics) to this JSON file")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (data, configs, logs)")


def check_run_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuses a step or thread count below 1; resolves --precision auto for this CPU."""
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    if args.precision == "auto":
        args.precision = "bf16" if native_bf16() else "fp32"


def build_pairs(steps: int, work: Path) -> Path:
    """The first steps x 4 pairs of the demo set (repeated from the start if needed), in order."""
    rows = [line for line in PAIRS.read_text().splitlines() if line.strip()]
    needed = steps * MICRO_BATCH * ACCUMULATION
    path = work / "pairs.jsonl"
    path.write_text("".join(rows[i % len(rows)] + "\n" for i in range(needed)))
    return path


def expected_tokens(ids: list[dict]) -> list[int]:
    """Per optimizer step: the policy's forward tokens, prompt+chosen and prompt+rejected of each pair, cut at 512."""
    per_pair = [sum(min(SEQ_LEN, len(p["prompt_ids"]) + len(p[k])) for k in ("chosen_ids", "rejected_ids"))
                for p in ids]
    per_step = MICRO_BATCH * ACCUMULATION
    return [sum(per_pair[i:i + per_step]) for i in range(0, len(per_pair), per_step)]


# ---------------------------------------------------------------- systems


def lmforge_command(method: str, a, d: Path) -> list[str]:
    config = {
        "recipe": "dpo",
        "model": {"path": str(a.model_dir), "dtype": "float32" if a.precision == "fp32" else "auto"},
        "method": method,
        "lora": {"rank": LORA["rank"], "alpha": LORA["alpha"], "dropout": 0.0,
                 "target_modules": LORA["target_modules"]},
        "preference": {"loss": "sigmoid", "beta": BETA},
        "data": {"train": [{"path": str(a.pairs), "format": "preference"}], "max_seq_len": SEQ_LEN,
                 "packing": False, "shuffle": False, "cache_dir": str(d / "data-cache")},
        "optimizer": {"lr": LR[method], "weight_decay": 0.0},
        "scheduler": {"name": "constant", "warmup_steps": 0},
        "checkpoint": {"every_steps": 0, "resume": "never"},
        "eval": {"every_steps": 0},
        "logging": {"every_steps": 1},
        "output_dir": str(d / "out"), "seed": SEED, "micro_batch_size": MICRO_BATCH,
        "batch_size": MICRO_BATCH * ACCUMULATION, "max_steps": a.steps, "max_grad_norm": None,
        "precision": "fp32" if a.precision == "fp32" else "bf16-mixed", "device": "cpu", "threads": a.threads,
    }
    (d / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return [str(LMFORGE_BIN), "train", str(d / "config.yaml")]


def trl_command(method: str, a, d: Path) -> list[str]:
    job = {"method": method, "model_dir": str(a.model_dir), "pairs": str(a.pairs), "metrics": str(d / "metrics.jsonl"),
           "output_dir": str(d / "out"), "steps": a.steps, "micro_batch": MICRO_BATCH, "accumulation": ACCUMULATION,
           "lr": LR[method], "lora": LORA, "threads": a.threads, "seed": SEED, "beta": BETA, "max_length": SEQ_LEN,
           "bf16": a.precision == "bf16"}
    (d / "job.json").write_text(json.dumps(job, indent=1))
    return [str(common.peer_python(common.TRAIN_PEERS)), str(HERE / "_dpo_peers.py"), "trl", str(d / "job.json")]


def torchtune_command(method: str, a, d: Path) -> list[str]:
    model = {"_component_": "torchtune.models.llama3_2.lora_llama3_2",
             "lora_attn_modules": [{"o_proj": "output_proj"}.get(m, m) for m in LORA["target_modules"]],
             "apply_lora_to_mlp": False, "apply_lora_to_output": False, **model_shape(a.model_dir),
             "lora_rank": LORA["rank"], "lora_alpha": LORA["alpha"], "lora_dropout": 0.0}
    config = {
        "output_dir": str(d / "out"),
        "model": model,
        "tokenizer": {"_component_": "_train_peers.IdsTokenizer", "pad_id": a.pad_id},
        "checkpointer": {"_component_": "torchtune.training.FullModelHFCheckpointer",
                         "checkpoint_dir": str(a.model_dir), "checkpoint_files": ["model.safetensors"],
                         "recipe_checkpoint": None, "output_dir": str(d / "out"), "model_type": "LLAMA3_2"},
        "resume_from_checkpoint": False, "save_adapter_weights_only": True,
        "dataset": {"_component_": "_dpo_peers.PairIdsDataset", "path": str(a.ids), "max_seq_len": SEQ_LEN},
        "seed": SEED, "shuffle": False, "batch_size": MICRO_BATCH,
        "optimizer": {"_component_": "torch.optim.AdamW", "fused": True, "lr": LR[method], "weight_decay": 0.0},
        "lr_scheduler": {"_component_": "_train_peers.constant_schedule"},
        "loss": {"_component_": "torchtune.rlhf.loss.DPOLoss", "beta": BETA, "label_smoothing": 0.0},
        "epochs": 1, "max_steps_per_epoch": a.steps, "gradient_accumulation_steps": ACCUMULATION, "compile": False,
        "metric_logger": {"_component_": "_dpo_peers.DPOStepLogger", "path": str(d / "metrics.jsonl")},
        "log_every_n_steps": 1, "log_peak_memory_stats": False,
        "device": "cpu", "dtype": a.precision,
        "enable_activation_checkpointing": False, "enable_activation_offloading": False,
    }
    (d / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    tune = common.peer_python(common.TRAIN_PEERS).with_name("tune")
    return [str(tune), "run", "lora_dpo_single_device", "--config", str(d / "config.yaml")]


def unavailable(system: str, method: str, d: Path, a) -> str | None:
    """Why `system` cannot run `method` here, or None."""
    if system == "torchtune" and method == "full":
        return ("torchtune's only full-parameter DPO recipe, full_dpo_distributed, initialises NCCL, which a CPU "
                "build of torch lacks")
    if system == "lmforge":
        if not LMFORGE_BIN.exists():
            return f"not installed ({LMFORGE_BIN} is missing)"
        lmforge_command(method, a, d)
        probe = subprocess.run([str(LMFORGE_BIN), "config", "check", str(d / "config.yaml")], capture_output=True,
                               text=True)
        if probe.returncode != 0:
            last = ((probe.stderr + probe.stdout).strip().splitlines() or ["?"])[-1]
            return f"the DPO recipe does not exist yet (`lmforge config check` rejects `recipe: dpo`: {last[:300]})"
        return None
    try:
        python = common.peer_python(common.TRAIN_PEERS)
    except common.PeerMissing as e:
        return str(e)
    module = {"trl": "trl, peft", "torchtune": "torchtune"}[system]
    probe = subprocess.run([str(python), "-c", f"import {module}"], capture_output=True, text=True)
    return f"not installed in {python} ({module})" if probe.returncode else None


# ---------------------------------------------------------------- report


def accuracy(run: Run) -> float | None:
    tail = [s["rewards/accuracies"] for s in run.steps if "rewards/accuracies" in s][-5:]
    return sum(tail) / len(tail) if tail else None


def print_method(method: str, runs: list[Run], expected: list[int], threads: int) -> None:
    print(f"\n{METHODS[method]} DPO (lr {LR[method]:g})")
    header = ["system", "tokens/s", "s/step", "peak RSS GiB", "tokens/step", "loss first", "loss last", "acc",
              "margin", "threads", "CPU others"]
    rows = []
    for r in runs:
        if not r.ok:
            rows.append([SYSTEMS[r.system]] + ["-"] * (len(header) - 1))
            continue
        acc, margin = accuracy(r), r.steps[-1].get("rewards/margins")
        rows.append([SYSTEMS[r.system], f"{r.tokens_per_second():.1f}", f"{r.seconds_per_step():.2f}",
                     f"{r.peak_rss / 2**30:.2f}", f"{sum(s['tokens'] for s in r.steps) / len(r.steps):.0f}",
                     f"{r.losses()[0]:.3f}", f"{r.losses()[-1]:.3f}", "-" if acc is None else f"{acc:.2f}",
                     "-" if margin is None else f"{margin:.3f}", str(r.threads) if r.threads else f"{threads} (cfg)",
                     f"{r.others:.0%}" + (" !" if r.others > common.DISTURBED else "")])
    common.print_table(header, rows)
    for r in runs:
        if r.note:
            print(f"  {SYSTEMS[r.system]}: {r.note}")
        elif expected and [s["tokens"] for s in r.steps] != expected[:len(r.steps)]:
            got = [s["tokens"] for s in r.steps]
            print(f"  {SYSTEMS[r.system]}: tokens per step {got} differ from the expected {expected[:len(got)]}")
        if r.ok and r.others > common.DISTURBED:
            print(f"  {SYSTEMS[r.system]}: disturbed (other processes used {r.others:.0%} of the CPUs)")
    by = {r.system: r for r in runs if r.ok}
    ours, peers = by.get("lmforge"), [r for r in by.values() if r.system != "lmforge"]
    if ours and peers:
        fastest = max(peers, key=Run.tokens_per_second)
        ratio = ours.tokens_per_second() / fastest.tokens_per_second()
        print(f"  lmforge / {SYSTEMS[fastest.system]} (the faster peer here), tokens/s: {ratio:.2f}x  "
              f"[target >= 2x: {'met' if ratio >= 2 else 'not met'}]")
    if ours and "trl" in by:
        ratio = ours.peak_rss / by["trl"].peak_rss
        print(f"  lmforge / TRL, peak RSS: {ratio:.2f}x  [target <= 0.6x: {'met' if ratio <= 0.6 else 'not met'}]")
    if by:
        print("  loss per step:")
        for r in by.values():
            print(f"    {SYSTEMS[r.system]:<15} " + " ".join(f"{x:.3f}" for x in r.losses()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per run (4 pairs each)")
    parser.add_argument("--methods", default="lora,full", help="comma-separated: lora, full")
    parser.add_argument("--systems", default="lmforge,trl,torchtune", help="comma-separated: " + ",".join(SYSTEMS))
    add_run_options(parser)
    args = parser.parse_args()
    methods, systems = args.methods.split(","), args.systems.split(",")
    bad = [m for m in methods if m not in METHODS] + [s for s in systems if s not in SYSTEMS]
    if bad:
        parser.error(f"unknown method or system: {', '.join(bad)}")
    check_run_options(parser, args)

    resolve_model(args)
    work = Path(tempfile.mkdtemp(prefix="lmforge-bench-dpo-"))
    args.pairs = build_pairs(args.steps, work)
    args.ids, expected = work / "ids.json", []
    try:
        python = common.peer_python(common.TRAIN_PEERS)
    except common.PeerMissing:
        python = None  # the peers' rows say why; lmforge runs without the expected counts
    if python is not None:
        job = {"model_dir": str(args.model_dir), "pairs": str(args.pairs), "ids": str(args.ids)}
        (work / "tokenize.json").write_text(json.dumps(job))
        done = subprocess.run([str(python), str(HERE / "_dpo_peers.py"), "tokenize", str(work / "tokenize.json")],
                              capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"error: tokenising the pairs in the peers' venv failed: {done.stderr.strip()[-500:]}")
        expected = expected_tokens(json.loads(args.ids.read_text()))

    found = common.versions(['torch', 'transformers', 'trl', 'peft', 'torchtune'])
    print(f"CPU: {common.cpu_name()}; {args.threads} threads (OMP_NUM_THREADS)")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in found.items()))
    print(f"model: SmolLM2-135M-Instruct, {args.model_dir}")
    pairs = args.steps * MICRO_BATCH * ACCUMULATION
    print(f"data: the first {pairs} pairs of {PAIRS.name} in order; {MICRO_BATCH} pairs x accumulation "
          f"{ACCUMULATION} per step, {args.steps} steps; trained tokens = the policy's forward tokens "
          f"(prompt+chosen + prompt+rejected)" + (f", expected per step: mean {sum(expected) / len(expected):.0f}"
                                                  if expected else ""))
    native = "native bfloat16" if native_bf16() else "no native bfloat16"
    print(f"precision: {args.precision} for every system ({native} on this CPU)")
    print_window(args.steps, work)

    commands = {"lmforge": lmforge_command, "trl": trl_command, "torchtune": torchtune_command}
    runs: dict[str, list[Run]] = {}
    for method in methods:
        for system in systems:
            run = Run(system, method)
            runs.setdefault(method, []).append(run)
            d = work / f"{system}-{method}"
            d.mkdir()
            reason = unavailable(system, method, d, args)
            if reason:
                run.note = f"skipped, {reason}"
                print(f"{SYSTEMS[system]} {method}: {run.note}", flush=True)
                continue
            run_reported(run, SYSTEMS[system], commands[system](method, args, d), d, args.threads, args.timeout)

    for method, method_runs in runs.items():
        print_method(method, method_runs, expected, args.threads)
    if args.out:
        out = {"setup": {"cpu": common.cpu_name(), "threads": args.threads, "precision": args.precision,
                         "versions": found, "pairs": pairs, "steps": args.steps, "warmup_steps_excluded": WARMUP_STEPS,
                         "max_len": SEQ_LEN, "micro_batch_pairs": MICRO_BATCH, "accumulation": ACCUMULATION,
                         "beta": BETA, "lora": LORA, "lr": LR, "expected_tokens_per_step": expected},
               "runs": [run_record(r) for rs in runs.values() for r in rs]}
        args.out.write_text(json.dumps(out, indent=1))
        print(f"\nwrote {args.out}")
    clean_up(work, runs, args.keep)


if __name__ == "__main__":
    main()
