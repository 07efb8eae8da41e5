"""The peers of benchmarks/dpo.py, run in the peers' virtual environment, never imported by lmforge.

    python _dpo_peers.py tokenize JOB.json   the pairs as token ids, the way TRL's DPOTrainer tokenises them
    python _dpo_peers.py trl JOB.json        TRL's DPOTrainer (+ PEFT for LoRA), one run
    tune run lora_dpo_single_device --config CFG.yaml    torchtune's own recipe, with PYTHONPATH holding this
        directory so that the config can name the components below

Runs write one JSON line per optimizer step to the job's metrics file: {"step", "loss", "lr", "tokens", "seconds"}
and the DPO metrics each trainer logs ("rewards/accuracies", "rewards/margins", ...). "tokens" counts the tokens
the policy runs forward on: per pair, prompt+chosen and prompt+rejected, pads excluded (the reference pass is not
counted); "seconds" as in _train_peers.py (from the end of the previous step, data loading included).

Module-level imports stay light (json, time, torch): torchtune imports this file inside the run whose memory is
measured, and transformers must not be loaded there.
"""

import json
import sys
import time
from pathlib import Path

import torch
from _train_peers import StepLogger, _StepClock, _write

DPO_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")
IGNORE = -100  # the label both peers ignore


def conversation(pair: dict) -> dict:
    """A string pair as TRL's conversational shape: the prompt is a user turn, each answer an assistant turn."""
    return {"prompt": [{"role": "user", "content": pair["prompt"]}],
            "chosen": [{"role": "assistant", "content": pair["chosen"]}],
            "rejected": [{"role": "assistant", "content": pair["rejected"]}]}


# ---------------------------------------------------------------- token ids (TRL's tokenisation)


def run_tokenize(job: dict) -> None:
    """Writes [{"prompt_ids", "chosen_ids", "rejected_ids"}] for the job's pairs: the chat template applied to the
    prompt (with the generation prompt) and to prompt + answer, the answer being what follows their common prefix,
    as TRL's DPOTrainer._prepare_dataset does."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(job["model_dir"])
    out = []
    for line in Path(job["pairs"]).read_text().splitlines():
        conv = conversation(json.loads(line))
        prompt = tok.apply_chat_template(conv["prompt"], add_generation_prompt=True, tokenize=True,
                                         return_dict=True)["input_ids"]
        full = {k: tok.apply_chat_template(conv["prompt"] + conv[k], tokenize=True, return_dict=True)["input_ids"]
                for k in ("chosen", "rejected")}
        start = min(_common_prefix(prompt, ids) for ids in full.values())
        out.append({"prompt_ids": prompt[:start], "chosen_ids": full["chosen"][start:],
                    "rejected_ids": full["rejected"][start:]})
    Path(job["ids"]).write_text(json.dumps(out))


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


# ---------------------------------------------------------------- torchtune components (named in the YAML)


class PairIdsDataset(torch.utils.data.Dataset):
    """Pre-tokenised pairs in the shape torchtune's PreferenceDataset yields: prompt + answer as input ids, the
    same as labels with the prompt masked (the recipe shifts them), each cut at max_seq_len as TRL cuts them."""

    def __init__(self, tokenizer, path: str, max_seq_len: int) -> None:
        self.pairs = json.loads(Path(path).read_text())
        self.max_seq_len = max_seq_len

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        if _StepClock.start is None:
            _StepClock.start = time.perf_counter()
        pair, row = self.pairs[index], {}
        prompt = pair["prompt_ids"]
        for side in ("chosen", "rejected"):
            ids = (prompt + pair[f"{side}_ids"])[:self.max_seq_len]
            labels = ([IGNORE] * len(prompt) + pair[f"{side}_ids"])[:self.max_seq_len]
            row |= {f"{side}_input_ids": ids, f"{side}_labels": labels}
            _StepClock.tokens += len(ids)
        return row


class DPOStepLogger(StepLogger):
    """_train_peers.StepLogger plus the DPO metrics the recipe logs (of the step's last micro-batch: the recipe
    keeps no running mean of them)."""

    def log_dict(self, payload, step: int) -> None:
        now = time.perf_counter()
        _write(self.path, {"step": step, "loss": float(payload["loss"]), "lr": float(payload["lr"]),
                           "tokens": _StepClock.tokens, "seconds": now - _StepClock.start,
                           "recipe_tokens_per_second": float(payload["tokens_per_second_per_gpu"]),
                           **{k: float(payload[k]) for k in DPO_METRICS if k in payload}})
        _StepClock.tokens, _StepClock.start = 0, now


# ---------------------------------------------------------------- TRL DPOTrainer (+ PEFT)


def run_trl(job: dict) -> None:
    # As in _train_peers.run_trainer: torchao 0.13 (torchtune's pin) makes recent PEFT refuse LoRA injection.
    sys.modules["torchao"] = None
    import transformers
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(job["threads"])
    transformers.utils.logging.disable_progress_bar()
    metrics = job["metrics"]
    _write(metrics, {"threads": torch.get_num_threads()})
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(job["model_dir"])
    peft_config = None
    if job["method"] == "lora":
        from peft import LoraConfig

        lora = job["lora"]
        peft_config = LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=0.0,
                                 target_modules=lora["target_modules"], task_type="CAUSAL_LM")
    rows = [conversation(json.loads(line)) for line in Path(job["pairs"]).read_text().splitlines()]

    class StepTimer(TrainerCallback):
        pending: dict | None = None

        def on_epoch_begin(self, args, state, control, **kwargs):
            _StepClock.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            self.pending = {"step": state.global_step, "tokens": _StepClock.tokens, "seconds": now - _StepClock.start}
            _StepClock.tokens, _StepClock.start = 0, now

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.pending and logs and "loss" in logs:
                _write(metrics, {**self.pending, "loss": float(logs["loss"]),
                                 "lr": float(logs.get("learning_rate", float("nan"))),
                                 **{k: float(logs[k]) for k in DPO_METRICS if k in logs}})
                self.pending = None

    args = DPOConfig(
        output_dir=job["output_dir"], per_device_train_batch_size=job["micro_batch"],
        gradient_accumulation_steps=job["accumulation"], max_steps=job["steps"], learning_rate=job["lr"],
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=0.0,  # 0: no clipping
        bf16=job["bf16"], use_cpu=True, train_sampling_strategy="sequential", dataloader_num_workers=0,
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
        gradient_checkpointing=False,  # TRL defaults it on; the others keep the blocks' activations
        seed=job["seed"], beta=job["beta"], loss_type=["sigmoid"], max_length=job["max_length"],
    )
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[StepTimer()])
    policy = trainer.model.get_base_model() if peft_config is not None else trainer.model

    def count_tokens(module, args, kwargs) -> None:  # the policy's forward only: the reference runs under no_grad
        mask = kwargs.get("attention_mask")
        if torch.is_grad_enabled() and mask is not None:
            _StepClock.tokens += int(mask.sum())

    policy.register_forward_pre_hook(count_tokens, with_kwargs=True)
    trainer.train()


if __name__ == "__main__":
    modes = {"tokenize": run_tokenize, "trl": run_trl}
    if len(sys.argv) != 3 or sys.argv[1] not in modes:
        sys.exit("usage: _dpo_peers.py {tokenize,trl} JOB.json")
    modes[sys.argv[1]](json.loads(Path(sys.argv[2]).read_text()))
