"""The peers of benchmarks/train.py, run in the peers' virtual environment, never imported by lmforge.

    python _train_peers.py trainer JOB.json     Hugging Face Trainer (+ PEFT for LoRA), one run
    python _train_peers.py baseline JOB.json    the untrained model's loss on each step's rows (no training)
    tune run {lora,full}_finetune_single_device --config CFG.yaml    torchtune's own recipe, with PYTHONPATH
        holding this directory so that the config can name the components below

Both write one JSON line per optimizer step to the job's metrics file: {"step", "loss", "lr", "tokens",
"seconds"}. "tokens" counts the positions that are trained in the step, i.e. whose (shifted) label is not ignored,
as seen by the model; "seconds" is the wall time from the end of the previous step (for step 1: from the start
of its first batch) to the end of this one, data loading included.

Module-level imports stay light (json, time, torch): torchtune imports this file inside the run whose memory is
measured, and transformers must not be loaded there.
"""

import json
import sys
import time
from pathlib import Path

import torch


class _StepClock:
    """Shared by the dataset (which sees every row the recipe fetches) and the metric logger (called once per
    optimizer step): trained tokens and wall time since the last logged step."""

    start: float | None = None
    tokens = 0


def _write(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


# ---------------------------------------------------------------- torchtune components (named in the YAML)


class TokenIdsDataset(torch.utils.data.Dataset):
    """Pre-tokenised rows for torchtune's recipes: every token is a label (continued pre-training); the recipe
    shifts the labels itself, so a row of n tokens trains n - 1 positions."""

    def __init__(self, tokenizer, path: str, packed: bool = False) -> None:
        self.rows = json.loads(Path(path).read_text())

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        if _StepClock.start is None:
            _StepClock.start = time.perf_counter()
        ids = self.rows[index]
        _StepClock.tokens += len(ids) - 1
        return {"tokens": list(ids), "labels": list(ids)}


class IdsTokenizer:
    """The recipes build a tokenizer only for its pad id (the rows arrive tokenised)."""

    def __init__(self, pad_id: int, max_seq_len: int | None = None) -> None:
        self.pad_id = pad_id
        self.max_seq_len = max_seq_len


class StepLogger:
    """A torchtune metric logger writing the benchmark's per-step JSONL (torchtune's own tokens/s, which counts
    the unshifted labels, is kept as recipe_tokens_per_second). The benchmark reads only the per-step dicts, so
    the protocol's other calls (single scalars, the config, close) have nothing to record."""

    def __init__(self, path: str) -> None:
        self.path = path
        _write(path, {"threads": torch.get_num_threads()})

    def log(self, name: str, data, step: int) -> None:
        pass

    def log_config(self, config) -> None:
        pass

    def log_dict(self, payload, step: int) -> None:
        now = time.perf_counter()
        _write(self.path, {"step": step, "loss": float(payload["loss"]), "lr": float(payload["lr"]),
                           "tokens": _StepClock.tokens, "seconds": now - _StepClock.start,
                           "recipe_tokens_per_second": float(payload["tokens_per_second_per_gpu"])})
        _StepClock.tokens, _StepClock.start = 0, now

    def close(self) -> None:
        pass


def constant_schedule(optimizer, num_training_steps: int, last_epoch: int = -1):
    """The LoRA recipe requires an lr_scheduler; this one keeps the lr constant (no warm-up), like the others."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0, last_epoch)


# ---------------------------------------------------------------- Hugging Face Trainer (+ PEFT)


def run_trainer(job: dict) -> None:
    # torchtune 0.6.1 pins torchao 0.13, which recent PEFT refuses at LoRA injection ("only versions above 0.16.0
    # are supported") although no torchao-quantized layer is involved: hide it from this process, which never uses
    # it (importlib.util.find_spec then reports it absent and PEFT takes its plain nn.Linear LoRA layer).
    sys.modules["torchao"] = None
    import transformers
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    torch.set_num_threads(job["threads"])
    transformers.utils.logging.disable_progress_bar()
    metrics = job["metrics"]
    _write(metrics, {"threads": torch.get_num_threads()})
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=torch.float32)
    if job["method"] == "lora":
        from peft import LoraConfig, get_peft_model

        lora = job["lora"]
        model = get_peft_model(model, LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=0.0,
                                                 target_modules=lora["target_modules"], task_type="CAUSAL_LM"))

    rows = json.loads(Path(job["ids"]).read_text())

    class Rows(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(rows)

        def __getitem__(self, index: int) -> dict:
            ids = torch.tensor(rows[index])
            return {"input_ids": ids, "labels": ids.clone()}  # the model shifts the labels

    def count_tokens(module, args, kwargs) -> None:  # what the model trains on, not what the loader prefetched
        labels = kwargs.get("labels")
        if labels is not None:
            _StepClock.tokens += int((labels[..., 1:] != -100).sum())  # transformers' ignore label (no lmforge here)

    model.register_forward_pre_hook(count_tokens, with_kwargs=True)

    class StepTimer(TrainerCallback):
        pending: dict | None = None

        def on_epoch_begin(self, args, state, control, **kwargs):
            _StepClock.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            self.pending = {"step": state.global_step, "tokens": _StepClock.tokens,
                            "seconds": now - _StepClock.start}
            _StepClock.tokens, _StepClock.start = 0, now

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.pending and logs and "loss" in logs:
                _write(metrics, {**self.pending, "loss": float(logs["loss"]),
                                 "lr": float(logs.get("learning_rate", float("nan")))})
                self.pending = None

    args = TrainingArguments(
        output_dir=job["output_dir"], per_device_train_batch_size=job["micro_batch"],
        gradient_accumulation_steps=job["accumulation"], max_steps=job["steps"], learning_rate=job["lr"],
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        bf16=True, use_cpu=True, train_sampling_strategy="sequential", dataloader_num_workers=0,
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
        seed=job["seed"],
    )
    Trainer(model=model, args=args, train_dataset=Rows(), callbacks=[StepTimer()]).train()


# ---------------------------------------------------------------- the untrained model's loss on each step's rows


def run_baseline(job: dict) -> None:
    """What a run that learns nothing would log: the loss of the untrained model (float32 weights, bfloat16
    autocast, as the Trainer computes it) on each step's rows, token mean over the step like the training losses."""
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(job["threads"])
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=torch.float32).eval()
    rows = json.loads(Path(job["ids"]).read_text())
    per_step = job["micro_batch"] * job["accumulation"]
    for step in range(job["steps"]):
        total, count = 0.0, 0
        for first in range(step * per_step, (step + 1) * per_step, job["micro_batch"]):
            ids = torch.tensor(rows[first:first + job["micro_batch"]])
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(ids).logits
            labels = ids[:, 1:]
            total += float(torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels.flatten(),
                                                             reduction="sum"))
            count += labels.numel()
        _write(job["metrics"], {"step": step + 1, "loss": total / count, "tokens": count, "seconds": 0.0})


if __name__ == "__main__":
    modes = {"trainer": run_trainer, "baseline": run_baseline}
    if len(sys.argv) != 3 or sys.argv[1] not in modes:
        sys.exit("usage: _train_peers.py {trainer,baseline} JOB.json")
    modes[sys.argv[1]](json.loads(Path(sys.argv[2]).read_text()))
