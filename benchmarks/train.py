"""Fine-tuning throughput and memory: lmforge vs Hugging Face Trainer + PEFT vs torchtune, LoRA and full (issue 5).

Usage: python benchmarks/train.py [--steps 30] [--methods lora,full] [--systems lmforge,trainer,torchtune]
       [--threads 2] [--torchtune-dtype bf16] [--out results.json] [--keep] [--no-untrained]
All six runs of 30 steps (and the untrained-model pass) take about 35 minutes on the 2-core CI machine; a smoke
run is --steps 3 (about 8 minutes).

Setup. SmolLM2-135M-Instruct as a Hugging Face directory (`resolve_model("smollm2-135m")`: the embedded GGUF
converted once into ~/.cache/lmforge, float32 safetensors); every system loads that directory. The CPU model, the
threads and every system's version are printed with the results.
Data: the docstrings of Python's standard library (read with `ast` from this interpreter's stdlib sources, nothing
downloaded), joined in file order and cut into texts long enough to exceed 512 tokens. Each row is the first 512
tokens of one text (SmolLM2's tokenizer, no BOS: the model adds none); rows are used in order, never shuffled, so
every system sees the same rows in the same steps. lmforge reads the texts (`format: text`, which truncates to
max_seq_len 512); the peers receive the token ids. Every token is a label (continued pre-training) and the usual
shift applies, so a row trains 511 positions and a step 4 x 2 x 511 = 4088: a trained token is a position whose
label is not ignored. Trainer and torchtune count them where the model receives its batch; lmforge reports its own.
Training: micro-batch 4, gradient accumulation 2 (8 rows, 4096 tokens per optimizer step), `--steps` optimizer
steps (default 30), AdamW (fused; betas 0.9/0.999, eps 1e-8, no weight decay) at a constant learning rate with no
warm-up, 2e-4 for LoRA and 2e-5 for full fine-tuning, gradient norm clipped at 1.0, no activation checkpointing,
no evaluation, no checkpoints during the run. LoRA: rank 8, alpha 16, dropout 0 on q_proj, k_proj, v_proj and o_proj
of every layer (torchtune calls o_proj output_proj).
Threads: `--threads` (default 2), as OMP_NUM_THREADS/MKL_NUM_THREADS for every run, torch.set_num_threads for the
Trainer, `threads:` in lmforge's config; the peers record the thread count torch used ("(cfg)": lmforge's
configured count, which its metrics do not repeat).

Systems, each run alone in its own process, one after the other:
  lmforge       `lmforge train CONFIG.yaml` (precision bf16-mixed, packing on, model.dtype auto: float32 weights
                for full fine-tuning, a bfloat16 frozen base under LoRA); reads OUTPUT_DIR/metrics.jsonl. Skipped
                with a message while `lmforge train` does not exist or its modules do not import yet.
  trainer       transformers.Trainer (+ peft.get_peft_model for LoRA) in the peers' venv (benchmarks/_train_peers.py):
                float32 weights, bf16=True (bfloat16 autocast) with use_cpu=True, sequential sampling.
  torchtune     `tune run lora_finetune_single_device` / `full_finetune_single_device`, torchtune's own recipes
                with a generated YAML: the llama3_2 component builders with SmolLM2's shape read from config.json
                (30 layers, 576 hidden, 9 heads, 3 kv heads, 1536 intermediate, 49152 vocab, tied embeddings, rope
                theta 100000, scale_factor 1 = unscaled RoPE), weights through FullModelHFCheckpointer (LLAMA3_2),
                its CEWithChunkedOutputLoss and dtype bf16 as its shipped configs have them: the recipes have no
                autocast, so bf16 means bfloat16 weights, gradients and optimizer state (--torchtune-dtype fp32
                for float32). The dataset, tokenizer stub, constant lr schedule and metric logger named in the
                YAML live in benchmarks/_train_peers.py; the LoRA run saves the adapter only.
  Peers venv (torch pinned in the same command, otherwise pip fetches a CUDA build):
      python3 -m venv VENV
      VENV/bin/pip install torch==2.13.0 transformers peft trl accelerate datasets torchtune==0.6.1 torchao==0.13.0
      export LMFORGE_PEERS_PYTHON=VENV/bin/python   (its `tune` is taken from the same bin directory)
  Without LMFORGE_PEERS_PYTHON the peers' rows say so and the untrained-model losses are left out.

  The Trainer process hides torchao (sys.modules["torchao"] = None): torchtune's pin, torchao 0.13, makes recent
  PEFT refuse LoRA injection although no torchao layer is involved.

Measured: per optimizer step, its trained tokens and wall time (data loading included). tokens/s is the sum of
tokens over the sum of seconds and s/step their mean, both over the steps after the first 2 (warm-up; with 2 steps
or fewer, all steps). Peak RSS is the child process's ru_maxrss (os.wait4), the same for every system, start-up
and the final save included (this process keeps torch out of itself: a child's ru_maxrss starts from the
high-water mark of the process it was forked from). Loss: each system's per-step training loss (token mean over
the step's 8 rows, computed before that step's update). The rows differ from step to step, and so does their
difficulty, so a falling curve alone proves little: the harness also computes the untrained model's loss on every
step's rows (one forward pass each, float32 weights under bfloat16 autocast, in the peers' venv), and "gain" is
that untrained loss minus the system's loss, averaged over the last 5 steps (fewer in short runs): about 0 for a
run whose updates round away. Targets of issue 5: lmforge >= 1.5x the tokens/s of the faster peer, <= 0.8x
Trainer + PEFT's peak RSS, and still learning, checked here as a gain at least half of Trainer + PEFT's (float32
master weights). The machine may be shared: each run prints the share of CPU time other processes used meanwhile
and is marked disturbed above 5%.
"""

import argparse
import ast
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import common
import yaml

HERE = Path(__file__).resolve().parent
PEER_PACKAGES = ["torch", "transformers", "peft", "accelerate", "torchtune", "torchao"]  # versions printed
LMFORGE_BIN = Path(sys.executable).with_name("lmforge")
SEQ_LEN, MICRO_BATCH, ACCUMULATION, WARMUP_STEPS = 512, 4, 2, 2
LORA = {"rank": 8, "alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
LR = {"lora": 2e-4, "full": 2e-5}
SEED = 42
SYSTEMS = {"lmforge": "lmforge", "trainer": "Trainer+PEFT", "torchtune": "torchtune"}
METHODS = {"lora": "LoRA", "full": "full fine-tuning"}
STDLIB_SKIP = {"test", "tests", "idlelib", "tkinter", "turtledemo", "lib2to3", "site-packages", "dist-packages",
               "ensurepip", "pydoc_data", "__pycache__"}
TEXT_CHARS = 2400  # texts are cut at docstring boundaries once this long, then extended until > SEQ_LEN tokens


@dataclass
class Run:
    system: str
    method: str
    note: str = ""  # why it did not run, or how it failed
    steps: list[dict] = field(default_factory=list)
    peak_rss: float = 0.0  # bytes
    wall: float = 0.0
    others: float = 0.0  # share of the machine's CPU time used by other processes meanwhile
    threads: int | None = None
    # seconds spent before step 1 on work the steps then skip (lmforge's precomputed DPO reference log-probs, for
    # every pair of the run): the measured steps are charged their share of it
    upfront: float = 0.0

    @property
    def ok(self) -> bool:
        return bool(self.steps) and not self.note

    def measured(self) -> list[dict]:
        return self.steps[WARMUP_STEPS:] if len(self.steps) > WARMUP_STEPS else self.steps

    def measured_seconds(self) -> float:
        m = self.measured()
        return sum(s["seconds"] for s in m) + self.upfront * len(m) / len(self.steps)

    def tokens_per_second(self) -> float:
        return sum(s["tokens"] for s in self.measured()) / self.measured_seconds()

    def seconds_per_step(self) -> float:
        return self.measured_seconds() / len(self.measured())

    def losses(self) -> list[float]:
        return [s["loss"] for s in self.steps]

    def gain(self, untrained: list[float]) -> float | None:
        """Untrained loss minus this run's loss on the same rows, mean over the last (up to 5) steps."""
        pairs = list(zip(untrained, self.losses(), strict=False))
        if not pairs:
            return None
        tail = pairs[-max(1, min(5, len(pairs) // 3)):]
        return sum(base - loss for base, loss in tail) / len(tail)


# ---------------------------------------------------------------- data


def stdlib_docstrings(min_chars: int = 200) -> list[str]:
    """Docstrings of the standard library's modules, classes and functions, in file and source order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        if STDLIB_SKIP & set(path.relative_to(root).parts[:-1]):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        nodes = [n for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                                              ast.AsyncFunctionDef))]
        for node in sorted(nodes, key=lambda n: getattr(n, "lineno", 0)):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= min_chars:
                docs.append(doc)
    return docs


def build_data(tokenizer, rows: int, work: Path) -> tuple[Path, Path, str]:
    """texts.jsonl for lmforge, ids.json (the first SEQ_LEN tokens of each text) for the peers."""
    docs, texts, ids, i, wrapped = stdlib_docstrings(), [], [], 0, False
    while len(texts) < rows:
        parts, chars = [], 0
        while True:
            if i == len(docs):
                i, wrapped = 0, True
            parts.append(docs[i])
            chars += len(docs[i]) + 2
            i += 1
            if chars < TEXT_CHARS:
                continue
            text = "\n\n".join(parts)
            tokens = tokenizer.encode(text, add_special_tokens=False)
            if len(tokens) > SEQ_LEN:
                break
        texts.append(text)
        ids.append(tokens[:SEQ_LEN])
    text_path, ids_path = work / "texts.jsonl", work / "ids.json"
    text_path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    ids_path.write_text(json.dumps(ids))
    info = (f"{rows} rows of {SEQ_LEN} tokens from the docstrings of Python {platform.python_version()}'s stdlib "
            f"({len(docs)} docstrings of >= 200 characters{', reused from the start' if wrapped else ''})")
    return text_path, ids_path, info


# ---------------------------------------------------------------- systems


def model_shape(model_dir: Path) -> dict:
    c = json.loads((model_dir / "config.json").read_text())
    return {"vocab_size": c["vocab_size"], "num_layers": c["num_hidden_layers"], "num_heads": c["num_attention_heads"],
            "num_kv_heads": c["num_key_value_heads"], "embed_dim": c["hidden_size"],
            "intermediate_dim": c["intermediate_size"], "norm_eps": c["rms_norm_eps"],
            "rope_base": c.get("rope_theta", 10000.0), "tie_word_embeddings": c.get("tie_word_embeddings", True),
            "max_seq_len": SEQ_LEN, "scale_factor": 1}


def lmforge_command(method: str, a, d: Path) -> list[str]:
    config = {
        "model": {"path": str(a.model_dir)},
        "method": method,
        "lora": {"rank": LORA["rank"], "alpha": LORA["alpha"], "dropout": 0.0,
                 "target_modules": LORA["target_modules"]},
        "data": {"train": [{"path": str(a.texts), "format": "text"}], "max_seq_len": SEQ_LEN, "packing": True,
                 "shuffle": False, "cache_dir": str(d / "data-cache")},
        "optimizer": {"lr": LR[method], "weight_decay": 0.0},
        "scheduler": {"name": "constant", "warmup_steps": 0},
        "checkpoint": {"every_steps": 0, "resume": "never"},
        "eval": {"every_steps": 0},
        "logging": {"every_steps": 1},
        "output_dir": str(d / "out"), "seed": SEED, "micro_batch_size": MICRO_BATCH,
        "batch_size": MICRO_BATCH * ACCUMULATION, "max_steps": a.steps, "max_grad_norm": 1.0,
        "precision": "bf16-mixed", "device": "cpu", "threads": a.threads,
    }
    (d / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return [str(LMFORGE_BIN), "train", str(d / "config.yaml")]


def trainer_command(method: str, a, d: Path, mode: str = "trainer") -> list[str]:
    job = {"method": method, "model_dir": str(a.model_dir), "ids": str(a.ids), "metrics": str(d / "metrics.jsonl"),
           "output_dir": str(d / "out"), "steps": a.steps, "micro_batch": MICRO_BATCH, "accumulation": ACCUMULATION,
           "lr": LR.get(method), "lora": LORA, "threads": a.threads, "seed": SEED}
    (d / "job.json").write_text(json.dumps(job, indent=1))
    return [str(common.peer_python(common.TRAIN_PEERS)), str(HERE / "_train_peers.py"), mode, str(d / "job.json")]


def torchtune_command(method: str, a, d: Path) -> list[str]:
    shape = model_shape(a.model_dir)
    if method == "lora":
        model = {"_component_": "torchtune.models.llama3_2.lora_llama3_2",
                 "lora_attn_modules": [{"o_proj": "output_proj"}.get(m, m) for m in LORA["target_modules"]],
                 "apply_lora_to_mlp": False, "apply_lora_to_output": False, **shape,
                 "lora_rank": LORA["rank"], "lora_alpha": LORA["alpha"], "lora_dropout": 0.0}
    else:
        model = {"_component_": "torchtune.models.llama3_2.llama3_2", **shape}
    config = {
        "output_dir": str(d / "out"),
        "model": model,
        "tokenizer": {"_component_": "_train_peers.IdsTokenizer", "pad_id": a.pad_id},
        "checkpointer": {"_component_": "torchtune.training.FullModelHFCheckpointer",
                         "checkpoint_dir": str(a.model_dir), "checkpoint_files": ["model.safetensors"],
                         "recipe_checkpoint": None, "output_dir": str(d / "out"), "model_type": "LLAMA3_2"},
        "resume_from_checkpoint": False,
        "dataset": {"_component_": "_train_peers.TokenIdsDataset", "path": str(a.ids), "packed": False},
        "seed": SEED, "shuffle": False, "batch_size": MICRO_BATCH,
        "optimizer": {"_component_": "torch.optim.AdamW", "fused": True, "lr": LR[method], "weight_decay": 0.0},
        "loss": {"_component_": "torchtune.modules.loss.CEWithChunkedOutputLoss"},
        "epochs": 1, "max_steps_per_epoch": a.steps, "gradient_accumulation_steps": ACCUMULATION,
        "clip_grad_norm": 1.0, "compile": False,
        "metric_logger": {"_component_": "_train_peers.StepLogger", "path": str(d / "metrics.jsonl")},
        "log_every_n_steps": 1, "log_peak_memory_stats": False,
        "device": "cpu", "dtype": a.torchtune_dtype,
        "enable_activation_checkpointing": False, "enable_activation_offloading": False,
        "profiler": {"_component_": "torchtune.training.setup_torch_profiler", "enabled": False},
    }
    if method == "lora":
        config |= {"save_adapter_weights_only": True,
                   "lr_scheduler": {"_component_": "_train_peers.constant_schedule"}}
    else:
        config |= {"optimizer_in_bwd": False}  # no lr_scheduler: the full recipe then keeps the lr constant
    (d / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    recipe = f"{method}_finetune_single_device"
    tune = common.peer_python(common.TRAIN_PEERS).with_name("tune")
    return [str(tune), "run", recipe, "--config", str(d / "config.yaml")]


def unavailable(system: str) -> str | None:
    if system == "lmforge":
        if not LMFORGE_BIN.exists():
            return f"not installed ({LMFORGE_BIN} is missing)"
        probe = subprocess.run([str(LMFORGE_BIN), "train", "--help"], capture_output=True, text=True)
        if probe.returncode != 0:
            last = (probe.stderr.strip().splitlines() or ["?"])[-1]
            return f"`lmforge train` is not available yet ({last[:200]})"
        return None
    try:
        python = common.peer_python(common.TRAIN_PEERS)
    except common.PeerMissing as e:
        return str(e)
    module = {"trainer": "transformers, peft", "torchtune": "torchtune"}[system]
    probe = subprocess.run([str(python), "-c", f"import {module}"], capture_output=True, text=True)
    return f"not installed in {python} ({module})" if probe.returncode else None


# ---------------------------------------------------------------- running


def kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_child(run: Run, cmd: list[str], d: Path, threads: int, timeout: float) -> None:
    """Runs one system to completion; peak RSS from the kernel's accounting of that process (and any children)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    log_path = d / "log.txt"
    with open(log_path, "w") as log, common.Stopwatch() as watch:
        proc = subprocess.Popen(cmd, cwd=d, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        timer = threading.Timer(timeout, kill_group, (proc.pid,))
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
            timed_out = not timer.is_alive()
        except BaseException:  # Ctrl-C: the child runs in its own session and would outlive this process
            kill_group(proc.pid)
            raise
        finally:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
    run.wall, run.others = watch.wall, watch.others
    run.peak_rss = usage.ru_maxrss * 1024
    metrics = d / ("out/metrics.jsonl" if run.system.startswith("lmforge") else "metrics.jsonl")
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    run.threads = next((r["threads"] for r in records if "threads" in r), None)
    run.steps = [r for r in records if {"step", "loss", "tokens", "seconds"} <= r.keys()]
    ahead = re.search(r"reference log-probs of \d+ pairs precomputed in ([0-9.]+) s",
                      log_path.read_text(errors="replace"))
    run.upfront = float(ahead.group(1)) if ahead and run.system.startswith("lmforge") else 0.0
    if proc.returncode != 0:
        lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
        missing = [line for line in lines if line.startswith(("ImportError:", "ModuleNotFoundError:"))]
        if run.system.startswith("lmforge") and missing and "lmforge" in missing[-1]:  # its trainer is not built yet
            run.note = f"skipped, `lmforge train` is not complete yet ({missing[-1]}; log {log_path})"
        else:
            why = f"killed after --timeout {timeout:.0f} s" if timed_out else f"exit {proc.returncode}"
            run.note = f"failed ({why}: {' | '.join(lines[-3:])[-500:]}; log {log_path})"
    elif not run.steps:
        run.note = f"no per-step metrics in {metrics} (log {log_path})"


# ---------------------------------------------------------------- report


def print_method(method: str, runs: list[Run], expected_tokens: int, untrained: list[float], threads: int) -> None:
    label = {"lora": f"LoRA (rank {LORA['rank']}, alpha {LORA['alpha']}, {','.join(LORA['target_modules'])}; "
                     f"lr {LR['lora']:g})", "full": f"full fine-tuning (lr {LR['full']:g})"}[method]
    print(f"\n{label}")
    header = ["system", "tokens/s", "s/step", "peak RSS GiB", "tokens/step", "loss first", "loss last", "gain",
              "threads", "CPU others"]
    rows = []
    for r in runs:
        if not r.ok:
            rows.append([SYSTEMS[r.system]] + ["-"] * (len(header) - 1))
            continue
        tokens, gain = {s["tokens"] for s in r.measured()}, r.gain(untrained)
        rows.append([SYSTEMS[r.system], f"{r.tokens_per_second():.1f}", f"{r.seconds_per_step():.2f}",
                     f"{r.peak_rss / 2**30:.2f}", "/".join(map(str, sorted(tokens))), f"{r.losses()[0]:.3f}",
                     f"{r.losses()[-1]:.3f}", "-" if gain is None else f"{gain:.3f}",
                     str(r.threads) if r.threads else f"{threads} (cfg)",
                     f"{r.others:.0%}" + (" !" if r.others > common.DISTURBED else "")])
    common.print_table(header, rows)
    for r in runs:
        if r.note:
            print(f"  {SYSTEMS[r.system]}: {r.note}")
        elif any(s["tokens"] != expected_tokens for s in r.steps):
            print(f"  {SYSTEMS[r.system]}: tokens per step differ from {expected_tokens} (see the table)")
        if r.ok and r.others > common.DISTURBED:
            print(f"  {SYSTEMS[r.system]}: disturbed (other processes used {r.others:.0%} of the CPUs)")
    by = {r.system: r for r in runs if r.ok}
    peers = [r for r in by.values() if r.system != "lmforge"]
    ours = by.get("lmforge")
    if ours and peers:
        fastest = max(peers, key=Run.tokens_per_second)
        ratio = ours.tokens_per_second() / fastest.tokens_per_second()
        print(f"  lmforge / {SYSTEMS[fastest.system]} (the faster peer here), tokens/s: {ratio:.2f}x  "
              f"[target >= 1.5x: {'met' if ratio >= 1.5 else 'not met'}]")
    if ours and "trainer" in by:
        ratio = ours.peak_rss / by["trainer"].peak_rss
        print(f"  lmforge / Trainer+PEFT, peak RSS: {ratio:.2f}x  "
              f"[target <= 0.8x: {'met' if ratio <= 0.8 else 'not met'}]")
        ours_gain, ref = ours.gain(untrained), by["trainer"].gain(untrained)
        if ours_gain is None or ref is None:
            print("  learns: unknown (no untrained-model losses)")
        else:
            verdict = "yes" if ours_gain >= 0.5 * ref else "no"
            if ref <= 0.005:
                verdict = "unclear (Trainer+PEFT gained nothing either: run more steps)"
            print(f"  learns: lmforge's gain {ours_gain:.3f} vs Trainer+PEFT's {ref:.3f} over the untrained loss  "
                  f"[at least half: {verdict}]")
    if by:
        print("  loss per step:")
        if untrained:
            print(f"    {'untrained':<14} " + " ".join(f"{x:.2f}" for x in untrained))
        for r in by.values():
            print(f"    {SYSTEMS[r.system]:<14} " + " ".join(f"{x:.2f}" for x in r.losses()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    parser.add_argument("--methods", default="lora,full", help="comma-separated: lora, full")
    parser.add_argument("--systems", default="lmforge,trainer,torchtune", help="comma-separated: " + ",".join(SYSTEMS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--torchtune-dtype", default="bf16", choices=["bf16", "fp32"],
                        help="torchtune's `dtype` (its recipes have no autocast: bf16 = bfloat16 weights)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per run before it is killed")
    parser.add_argument("--out", type=Path, help="write the results (with the loss curves) to this JSON file")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (data, configs, logs)")
    parser.add_argument("--no-untrained", action="store_true",
                        help="skip the untrained model's losses (one forward pass per row; the gain column needs them)")
    args = parser.parse_args()
    methods, systems = args.methods.split(","), args.systems.split(",")
    bad = [m for m in methods if m not in METHODS] + [s for s in systems if s not in SYSTEMS]
    if bad:
        parser.error(f"unknown method or system: {', '.join(bad)}")

    tokenizer = resolve_model(args)
    work = Path(tempfile.mkdtemp(prefix="lmforge-bench-train-"))
    args.texts, args.ids, data_info = build_data(tokenizer, args.steps * MICRO_BATCH * ACCUMULATION, work)
    expected = MICRO_BATCH * ACCUMULATION * (SEQ_LEN - 1)

    found = common.versions(PEER_PACKAGES)
    print(f"CPU: {common.cpu_name()}; {args.threads} threads (OMP_NUM_THREADS)")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in found.items()))
    print(f"model: SmolLM2-135M-Instruct, {args.model_dir}")
    print(f"data: {data_info}; micro-batch {MICRO_BATCH} x accumulation {ACCUMULATION}, {args.steps} steps, "
          f"{expected} trained tokens per step (every label, shifted)")
    print(f"precision: lmforge bf16-mixed; Trainer bf16 autocast over float32 weights; torchtune dtype "
          f"{args.torchtune_dtype} (no autocast)")
    print_window(args.steps, work)

    untrained: list[float] = []
    if not args.no_untrained and unavailable("trainer") is None:
        d = work / "untrained"
        d.mkdir()
        print("untrained model: losses on every step's rows ...", flush=True)
        base = Run("baseline", "none")
        run_child(base, trainer_command("none", args, d, mode="baseline"), d, args.threads, args.timeout)
        untrained = base.losses() if base.ok else []
        print(f"  {base.note or ' '.join(f'{x:.2f}' for x in untrained)} [{base.wall:.0f} s]", flush=True)

    commands = {"lmforge": lmforge_command, "trainer": trainer_command, "torchtune": torchtune_command}
    runs: dict[str, list[Run]] = {}
    for method in methods:
        for system in systems:
            run = Run(system, method)
            runs.setdefault(method, []).append(run)
            reason = unavailable(system)
            if reason:
                run.note = f"skipped, {reason}"
                print(f"{SYSTEMS[system]} {method}: {run.note}", flush=True)
                continue
            d = work / f"{system}-{method}"
            d.mkdir()
            run_reported(run, SYSTEMS[system], commands[system](method, args, d), d, args.threads, args.timeout)

    for method, method_runs in runs.items():
        print_method(method, method_runs, expected, untrained, args.threads)
    if args.out:
        out = {"setup": {"cpu": common.cpu_name(), "threads": args.threads, "versions": found, "data": data_info,
                         "steps": args.steps, "warmup_steps_excluded": WARMUP_STEPS, "seq_len": SEQ_LEN,
                         "micro_batch": MICRO_BATCH, "accumulation": ACCUMULATION, "lora": LORA, "lr": LR,
                         "torchtune_dtype": args.torchtune_dtype},
               "untrained_loss": untrained,
               "runs": [run_record(r, gain=r.gain(untrained) if r.ok else None) for rs in runs.values() for r in rs]}
        args.out.write_text(json.dumps(out, indent=1))
        print(f"\nwrote {args.out}")
    clean_up(work, runs, args.keep)


def resolve_model(args):
    """Sets args.model_dir (SmolLM2-135M-Instruct as an HF directory) and args.pad_id; returns its tokenizer."""
    from lmforge.tokenizer import Tokenizer

    # Resolved in a child: resolve_model imports torch, and this process stays small because a child's ru_maxrss
    # starts from the high-water mark of the process it was forked from.
    code = "from lmforge.weights.resolve import resolve_model; print(resolve_model('smollm2-135m', progress=False))"
    args.model_dir = Path(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                         check=True).stdout.strip().splitlines()[-1])
    tokenizer = Tokenizer.from_dir(args.model_dir)
    args.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return tokenizer


def print_window(steps: int, work: Path) -> None:
    window = (f"steps {WARMUP_STEPS + 1}-{steps} (the first {WARMUP_STEPS} are warm-up)"
              if steps > WARMUP_STEPS else f"all {steps} steps (too few to leave out warm-up)")
    print(f"tokens/s and s/step over {window}; peak RSS = ru_maxrss of each run's process; work directory {work}",
          flush=True)


def run_reported(run: Run, name: str, cmd: list[str], d: Path, threads: int, timeout: float) -> None:
    """run_child with a line before and one after: tokens/s and peak RSS, or why it failed."""
    print(f"{name} {run.method}: running ...", flush=True)
    run_child(run, cmd, d, threads, timeout)
    status = run.note or (f"{len(run.steps)} steps, {run.tokens_per_second():.1f} tokens/s, "
                          f"{run.peak_rss / 2**30:.2f} GiB")
    print(f"  {status} [{run.wall:.0f} s; other processes used {run.others:.0%} of the CPUs]", flush=True)


def run_record(r: Run, **extra) -> dict:
    """One run as the --out JSON holds it."""
    return {"system": r.system, "method": r.method, "note": r.note, "peak_rss_bytes": r.peak_rss,
            "wall_seconds": r.wall, "others_cpu_share": r.others, "threads": r.threads, "upfront_seconds": r.upfront,
            "tokens_per_second": r.tokens_per_second() if r.ok else None,
            "seconds_per_step": r.seconds_per_step() if r.ok else None, **extra, "steps": r.steps}


def clean_up(work: Path, runs: dict[str, list[Run]], keep: bool) -> None:
    """Removes the work directory unless asked to keep it or a run failed (its log is there)."""
    failed = any(r.note and not r.note.startswith("skipped") for rs in runs.values() for r in rs)
    if keep or failed:
        print(f"kept {work}" + ("" if keep else " (a run failed: its log is there)"))
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
