"""Supervised fine-tuning: full, LoRA or QLoRA. A readable script — `main(cfg)` is the whole run, top to bottom.

Each optimizer step takes `grad_accumulation` micro-batches (flat, packed: see lmforge/data), sums the token
cross-entropy of every trained token and divides by the trained tokens of the whole window, so the update is the
same as one big batch however the window's documents are split.
"""

import contextlib
import logging
import time
from pathlib import Path

import torch

from lmforge.config import TrainConfig, dump_config
from lmforge.data import build_datasets
from lmforge.layers.attention import AttnMeta
from lmforge.train import checkpoint as ckpt
from lmforge.train.allocator import release_free_memory
from lmforge.train.evaluate import evaluate
from lmforge.train.log import MetricsLog, require_backends
from lmforge.train.loss import token_loss_sum
from lmforge.train.model import build_trainable, load_trainable, save_trainable
from lmforge.train.optim import build_optimizer, build_scheduler
from lmforge.train.windows import Windows, validation_batches

log = logging.getLogger("lmforge")


def main(cfg: TrainConfig) -> Path:
    """Trains as configured; returns the directory of the final model (HF directory or PEFT adapter)."""
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.device == "auto" else cfg.device)

    require_backends(cfg.logging.backends)
    model, tokenizer, model_dir = build_trainable(cfg, device)
    data = build_datasets(cfg.data, tokenizer, cfg.seed)
    log.info("%s", data.report)
    windows = Windows(data.train, cfg, device)
    total_steps = cfg.max_steps or cfg.epochs * windows.steps_per_epoch
    log.info("effective batch: %d rows = micro-batch %d x gradient accumulation %d (%d rows of at most %d tokens per "
             "optimizer step); %d optimizer steps", cfg.batch_size, cfg.micro_batch_size, cfg.grad_accumulation,
             cfg.batch_size, cfg.data.max_seq_len, total_steps)
    optimizer = build_optimizer(model, cfg.optimizer)
    scheduler = build_scheduler(optimizer, cfg.scheduler, total_steps)
    scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16-mixed" else None
    state = {"step": 0, "best": None, "stale_evals": 0}

    if (resume := _resume_from(cfg, run_dir)) is not None:
        saved = ckpt.load_trainer_state(resume)
        load_trainable(model, cfg, resume)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        windows.load_state_dict(saved["data"])
        if scaler is not None and "scaler" in saved:
            scaler.load_state_dict(saved["scaler"])
        ckpt.set_rng_state(saved["rng"])
        state = saved["progress"]
        log.info("resumed from %s at step %d", resume, state["step"])

    def save_model(out: Path) -> None:
        save_trainable(model, cfg, model_dir, out)

    def trainer_state() -> dict:
        return {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "data": windows.state_dict(), "rng": ckpt.rng_state(), "progress": dict(state),
                **({"scaler": scaler.state_dict()} if scaler is not None else {})}

    metrics = MetricsLog(run_dir, cfg.logging.backends, cfg.logging.project, cfg.model_dump(mode="json"),
                         total_steps, state["step"])
    model.train()
    try:
        while state["step"] < total_steps:
            started = time.perf_counter()
            lr = scheduler.get_last_lr()[0]  # the rate this step uses
            loss, tokens, grad_norm = train_step(model, windows.next(), cfg, optimizer, scaler)
            scheduler.step()
            state["step"] += 1
            step, seconds = state["step"], time.perf_counter() - started
            record = {"loss": loss, "lr": lr, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
                      "epoch": windows.epoch, **({"grad_norm": grad_norm} if grad_norm is not None else {})}
            if step % cfg.logging.every_steps == 0 or step == total_steps:
                metrics.write(step, record)
            metrics.progress(step, loss, lr, tokens / seconds)
            stop = False
            if data.validation is not None and (_due(step, cfg.eval.every_steps) or step == total_steps):
                stop = _evaluate_and_track(model, data.validation, cfg, device, state, metrics, save_model, run_dir)
            if _due(step, cfg.checkpoint.every_steps) and step < total_steps:
                ckpt.save_checkpoint(run_dir, step, save_model, trainer_state(), cfg.checkpoint.keep_last)
            if stop:
                log.info("early stopping at step %d: val_loss did not improve for %d evaluations", step,
                         cfg.eval.early_stopping_patience)
                break
    finally:
        metrics.close()
    final = ckpt.write_atomically(run_dir / "final", save_model)
    log.info("run directory: %s; final %s: %s", run_dir, "model" if cfg.method == "full" else "adapter", final)
    return final


def train_step(model: torch.nn.Module, window: list, cfg: TrainConfig, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler | None) -> tuple[float, int, float | None]:
    """One optimizer step over a window of micro-batches; returns (mean token loss, trained tokens, grad norm)."""
    tokens = sum(batch.num_trained_tokens for batch in window)
    total = 0.0
    for batch in window:
        with autocast(cfg, batch.input_ids.device):
            hidden = model(batch.input_ids, batch.positions, AttnMeta.for_training(batch.cu_seqlens))
            loss_sum = token_loss_sum(model, hidden, batch.labels)
        loss = loss_sum / max(tokens, 1)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        total += loss_sum.item()
        release_free_memory()  # the activations just freed, before the next micro-batch allocates its own
    if scaler is not None:
        scaler.unscale_(optimizer)
    grad_norm = None
    if cfg.max_grad_norm is not None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm).item()
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total / max(tokens, 1), tokens, grad_norm


def autocast(cfg: TrainConfig, device: torch.device):
    if cfg.precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if cfg.precision == "bf16-mixed" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def _due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def _evaluate_and_track(model, validation, cfg: TrainConfig, device, state: dict, metrics: MetricsLog,
                        save_model, run_dir: Path) -> bool:
    """Validation loss and perplexity; keeps `best/`; True when early stopping's patience has run out."""
    result = evaluate(model, validation_batches(validation, cfg.micro_batch_size), device,
                      lambda: autocast(cfg, device), cfg.eval.max_batches)
    metrics.write(state["step"], result)
    log.info("step %d: val_loss %.4f, val_ppl %.2f", state["step"], result["val_loss"], result["val_ppl"])
    if state["best"] is None or result["val_loss"] < state["best"]:
        state["best"], state["stale_evals"] = result["val_loss"], 0
        ckpt.write_atomically(run_dir / "best", save_model)
        return False
    state["stale_evals"] += 1
    patience = cfg.eval.early_stopping_patience
    return patience > 0 and state["stale_evals"] >= patience


def _resume_from(cfg: TrainConfig, run_dir: Path) -> Path | None:
    if cfg.checkpoint.resume == "never":
        return None
    if cfg.checkpoint.resume == "auto":
        found = ckpt.checkpoints(run_dir)
        return found[-1] if found else None
    return Path(cfg.checkpoint.resume)
