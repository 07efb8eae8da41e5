"""The peer of benchmarks/grpo.py, run in the peers' virtual environment, never imported by lmforge.

    python _grpo_peers.py trl JOB.json    TRL's GRPOTrainer (+ PEFT LoRA), one run: transformers generation, or
                                          with "vllm" in the job vLLM colocated in the trainer's process

Writes one JSON line per optimizer step to the job's metrics file, with the keys lmforge's metrics.jsonl uses:
"seconds" (the update: the step's wall time minus its rollout), "rollout/seconds" (TRL's
_generate_and_score_completions: generation, rewards, advantages), "tokens" (completion tokens trained, EOS
included, pads excluded), "loss", "reward", "reward_std", "completions/mean_length" (as TRL logs them), and "rows"
(the prompts' line numbers in the prompt file, so the harness can check both systems trained the same prompts).
A step's wall time runs from the end of the previous step (step 1: the start of the epoch) to the end of this one.
"""

import json
import os
import sys
import time
from pathlib import Path

import torch
from _train_peers import _write

# TRL with vLLM as its rollout engine: colocated (one process, as lmforge's engine), no sleep mode (a CUDA feature),
# and the same sampler correction as lmforge's default (per token, truncated at 3) instead of TRL's sequence_mask.
VLLM_SETTINGS = {"use_vllm": True, "vllm_mode": "colocate", "vllm_enable_sleep_mode": False,
                 "vllm_max_model_length": 128, "vllm_importance_sampling_correction": True,
                 "vllm_importance_sampling_mode": "token_truncate", "vllm_importance_sampling_clip_max": 3.0}


def run_trl(job: dict) -> None:
    # As in _train_peers.run_trainer: torchao 0.13 (torchtune's pin) makes recent PEFT refuse LoRA injection.
    sys.modules["torchao"] = None
    if job.get("vllm"):  # vLLM's CPU backend: its KV cache size and threads (the harness's count) before it loads
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(job["vllm_kv_gib"]))
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{job['threads'] - 1}")
    import transformers
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    sys.path.insert(0, job["lmforge_root"])  # the very reward function lmforge runs (adds ~7 MiB: pydantic)
    from lmforge.train.rewards import exact_answer

    torch.set_num_threads(job["threads"])
    transformers.utils.logging.disable_progress_bar()
    metrics = job["metrics"]
    _write(metrics, {"threads": torch.get_num_threads()})
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(job["model_dir"])
    lora = job["lora"]
    peft_config = LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=0.0,
                             target_modules=lora["target_modules"], task_type="CAUSAL_LM")
    rows = [json.loads(line) for line in Path(job["prompts"]).read_text().splitlines()]

    clock = {"start": None, "rollout": 0.0, "tokens": 0, "rows": []}

    class StepTimer(TrainerCallback):
        pending: dict | None = None

        def on_epoch_begin(self, args, state, control, **kwargs):
            if clock["start"] is None:
                clock["start"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            total = now - clock["start"]
            self.pending = {"step": state.global_step, "tokens": clock["tokens"],
                            "seconds": total - clock["rollout"], "rollout/seconds": clock["rollout"],
                            "rows": clock["rows"]}
            clock.update(start=now, rollout=0.0, tokens=0, rows=[])

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.pending and logs and "loss" in logs:
                keep = ("reward", "reward_std", "completions/mean_length", "completions/clipped_ratio", "entropy",
                        "rewards/exact_answer/mean")
                _write(metrics, {**self.pending, "loss": float(logs["loss"]),
                                 "lr": float(logs.get("learning_rate", float("nan"))),
                                 **{k: float(logs[k]) for k in keep if logs.get(k) is not None}})
                self.pending = None

    args = GRPOConfig(
        output_dir=job["output_dir"], per_device_train_batch_size=job["micro_batch"],
        gradient_accumulation_steps=job["accumulation"], steps_per_generation=job["steps_per_generation"],
        num_iterations=1, max_steps=job["steps"], learning_rate=job["lr"], lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=job["max_grad_norm"],
        optim="adamw_torch_fused", adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
        bf16=job["bf16"], use_cpu=True, dataloader_num_workers=0, shuffle_dataset=False,  # rows in the given order
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
        gradient_checkpointing=False,  # TRL defaults it on; lmforge keeps the blocks' activations
        seed=job["seed"], num_generations=job["num_generations"], max_completion_length=job["max_completion_length"],
        temperature=job["temperature"], top_p=1.0, top_k=0, loss_type="dapo", beta=0.0, epsilon=job["epsilon"],
        **(VLLM_SETTINGS if job.get("vllm") else {"use_vllm": False}),
    )
    trainer = GRPOTrainer(model=model, reward_funcs=[exact_answer], args=args, train_dataset=Dataset.from_list(rows),
                          processing_class=tokenizer, peft_config=peft_config, callbacks=[StepTimer()])
    if getattr(trainer.args, "activation_checkpointing", trainer.args.gradient_checkpointing):
        sys.exit("TRL turned activation checkpointing on although the job turns it off")
    if trainer.args.generation_batch_size != job["micro_batch"] * job["accumulation"]:
        sys.exit(f"TRL's generation batch is {trainer.args.generation_batch_size} completions, not one optimizer "
                 f"step's {job['micro_batch'] * job['accumulation']}")
    generate_and_score = trainer._generate_and_score_completions

    def timed(inputs):  # the rollout: generation, rewards and advantages of one optimizer step's completions
        started = time.perf_counter()
        out = generate_and_score(inputs)
        clock["rollout"] += time.perf_counter() - started
        clock["tokens"] += int(out["completion_mask"].sum())
        clock["rows"] += sorted({row["row"] for row in inputs})
        return out

    trainer._generate_and_score_completions = timed
    trainer.train()


if __name__ == "__main__":
    modes = {"trl": run_trl}
    if len(sys.argv) != 3 or sys.argv[1] not in modes:
        sys.exit("usage: _grpo_peers.py trl JOB.json")
    modes[sys.argv[1]](json.loads(Path(sys.argv[2]).read_text()))
