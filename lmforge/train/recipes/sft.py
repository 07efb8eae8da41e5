"""Supervised fine-tuning: full, LoRA or QLoRA, in one process or many. A readable script — `main(cfg)` is the whole
run, top to bottom. The preference recipe (`recipe: dpo`, recipes/dpo.py; its kto loss in recipes/kto.py), reward
models (`recipe: reward`, recipes/reward.py) and distillation (`recipe: distill`, recipes/distill.py) run in this
same loop with their own objective: what a micro-batch's loss is, what the window's totals are, and what a step
logs.

Each optimizer step takes `grad_accumulation` micro-batches (flat, packed: see lmforge/data) on every rank, sums the
token cross-entropy of every trained token and divides by the trained tokens of the whole window on all ranks, so
the update is the same as one big batch however the window's documents are split between micro-batches and ranks.
Under torchrun (or `lmforge train --nproc N`) the model is wrapped by DDP or sharded by FSDP2 (lmforge/train/dist.py)
and each rank reads its own shard of the data; only rank 0 logs and writes metrics and model files.
"""

import contextlib
import json
import logging
import time
from pathlib import Path

import torch

from lmforge.config import TrainConfig, dump_config
from lmforge.data import build_datasets
from lmforge.layers.attention import AttnMeta
from lmforge.train import checkpoint as ckpt
from lmforge.train import dist
from lmforge.train.allocator import release_free_memory, skip_unusable_triton, trim_before_embedding_backward
from lmforge.train.evaluate import evaluate, evaluate_objective
from lmforge.train.log import MetricsLog, NoMetrics, require_backends
from lmforge.train.loss import token_loss_sum
from lmforge.train.model import build_trainable, gathered_weights, save_trainable
from lmforge.train.optim import build_optimizer, build_scheduler
from lmforge.train.recipes.distill import DistillObjective
from lmforge.train.recipes.dpo import PreferenceObjective
from lmforge.train.recipes.kto import KTOObjective
from lmforge.train.recipes.reward import RewardObjective
from lmforge.train.windows import Windows, validation_batches
from lmforge.weights.atomic import atomic_dir

log = logging.getLogger("lmforge")


def main(cfg: TrainConfig) -> Path:
    """Trains as configured; returns the directory of the final model (HF directory or PEFT adapter)."""
    return in_world(cfg, _train)


def in_world(cfg: TrainConfig, train) -> Path:
    """`train(cfg, world, device)` (a recipe's body) inside this process's world: torchrun's, SLURM's or one of
    one; precision auto resolved for the device; other ranks than 0 log warnings only."""
    skip_unusable_triton()
    world = dist.world_from_env()
    device = dist.device_for(cfg, world)
    cfg = cfg.on_device(device)
    dist.join(world, device)
    if not world.is_main:
        log.setLevel(logging.WARNING)
    try:
        return train(cfg, world, device)
    finally:
        dist.leave()


def _train(cfg: TrainConfig, world: dist.World, device: torch.device) -> Path:
    run_dir = Path(cfg.output_dir)
    accumulation = cfg.grad_accumulation(world.size)
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    require_backends(cfg.logging.backends if world.is_main else [])
    model, tokenizer, model_dir = build_trainable(cfg, device)
    trim_before_embedding_backward(model)
    objective = _objective(cfg, model, tokenizer, model_dir, device)  # a bad teacher fails before the run dir exists
    data = _datasets(cfg, tokenizer, world)  # and so does bad data (a malformed row under data.strict)
    if hasattr(objective, "prepare"):  # DPO's precomputed reference log-probs, before the optimizer state exists
        objective.prepare(data, world, device)
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_config(cfg))
    log.info("%s", data.report)
    runner, strategy = dist.wrap(model, cfg, world, device)
    windows = Windows(data.train, cfg, device, world.rank, world.size)
    total_steps = cfg.max_steps or cfg.epochs * windows.steps_per_epoch
    log.info("effective batch: %d rows = micro-batch %d x gradient accumulation %d x %d process%s (%s; rows of at "
             "most %d tokens); %d optimizer steps", cfg.batch_size, cfg.micro_batch_size, accumulation, world.size,
             "es" if world.size > 1 else "", strategy, data.train.row_len, total_steps)
    optimizer = build_optimizer(model, cfg.optimizer)
    scheduler = build_scheduler(optimizer, cfg.scheduler, total_steps)
    scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16-mixed" else None
    state = {"step": 0, "best": None, "stale_evals": 0}

    if (resume := _resume_from(cfg, run_dir)) is not None:
        saved = ckpt.load_trainer_state(resume)
        ckpt.load_training_state(resume, model, optimizer)
        scheduler.load_state_dict(saved["scheduler"])
        windows.load_state_dict(saved["data"])
        if scaler is not None and "scaler" in saved:
            scaler.load_state_dict(saved["scaler"])
        ckpt.set_rng_state(saved["rng"])
        state = saved["progress"]
        log.info("resumed from %s at step %d", resume, state["step"])

    def save_model(out: Path) -> None:  # every rank calls it (FSDP gathers the weights); rank 0 writes
        weights = {} if cfg.recipe == "reward" else gathered_weights(model, cfg)  # reward: one process, whole
        if world.is_main:
            save_trainable(weights, cfg, model_dir, model.config, out, model)

    def trainer_state() -> dict:
        return {"scheduler": scheduler.state_dict(), "data": windows.state_dict(), "rng": ckpt.rng_state(),
                "progress": dict(state), **({"scaler": scaler.state_dict()} if scaler is not None else {})}

    # sharded full weights are gathered only for best/ and final/: periodic checkpoints keep them in state/
    periodic_model = None if strategy == "fsdp" and cfg.method == "full" else save_model
    sync = lambda: dist.barrier(world)  # noqa: E731
    metrics = (MetricsLog(run_dir, cfg.logging.backends, cfg.logging.project, cfg.model_dump(mode="json"),
                          total_steps, state["step"]) if world.is_main else NoMetrics())
    runner.train()
    try:
        while state["step"] < total_steps:
            started = time.perf_counter()
            lr = scheduler.get_last_lr()[0]  # the rate this step uses
            result, grad_norm = train_step(model, windows.next(), cfg, optimizer, scaler, world, strategy, runner,
                                           objective)
            scheduler.step()
            state["step"] += 1
            step, seconds = state["step"], time.perf_counter() - started
            if step == 1:
                _record_state_memory(model, optimizer, world, device, strategy, run_dir)
            loss, tokens = result.pop("loss"), result.pop("tokens")
            record = {"loss": loss, "lr": lr, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
                      "epoch": windows.epoch, **({"grad_norm": grad_norm} if grad_norm is not None else {}), **result}
            if step % cfg.logging.every_steps == 0 or step == total_steps:
                metrics.write(step, record)
            metrics.progress(step, loss, lr, tokens / seconds)
            stop = False
            if data.validation is not None and (_due(step, cfg.eval.every_steps) or step == total_steps):
                stop = _evaluate_and_track(runner, model, objective, data.validation, cfg, device, state, metrics,
                                           save_model, run_dir, world)
            if _due(step, cfg.checkpoint.every_steps) and step < total_steps:
                ckpt.save_checkpoint(run_dir, step, periodic_model, model, optimizer, trainer_state(),
                                     cfg.checkpoint.keep_last, world.is_main, sync)
            if stop:
                log.info("early stopping at step %d: val_loss did not improve for %d evaluations", step,
                         cfg.eval.early_stopping_patience)
                break
    finally:
        metrics.close()
    final = _save_model_dir(run_dir / "final", save_model, world)
    kind = "model" if cfg.method == "full" or cfg.recipe == "reward" else "adapter"
    log.info("run directory: %s; final %s: %s", run_dir, kind, final)
    return final


def _objective(cfg: TrainConfig, model: torch.nn.Module, tokenizer, model_dir: Path, device: torch.device):
    if cfg.recipe == "dpo":
        kind = KTOObjective if cfg.preference.loss == "kto" else PreferenceObjective
        return kind(cfg, model, model_dir, device)
    if cfg.recipe == "distill":
        return DistillObjective(cfg, model, tokenizer, device)
    if cfg.recipe == "reward":
        return RewardObjective(cfg, model)
    return TokenLoss(model)


class TokenLoss:
    """SFT's objective: the summed cross-entropy of every trained token over the window's trained tokens."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def totals(self, window: list) -> list[float]:
        return [sum(batch.num_trained_tokens for batch in window)]

    def loss(self, runner: torch.nn.Module, batch, totals: list[float]) -> tuple[torch.Tensor, dict[str, float]]:
        hidden = runner(batch.input_ids, batch.positions, AttnMeta.for_training(batch.cu_seqlens, batch.prefix_lens))
        loss_sum = token_loss_sum(self.model, hidden, batch.labels)
        return loss_sum / max(totals[0], 1), {"loss": loss_sum.item()}

    def summary(self, sums: dict[str, float], totals: list[float]) -> dict[str, float]:
        return {"loss": sums["loss"] / max(totals[0], 1), "tokens": int(totals[0])}


def train_step(model: torch.nn.Module, window: list, cfg: TrainConfig, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler | None, world: dist.World = dist.SINGLE, strategy: str = "single",
               runner: torch.nn.Module | None = None, objective=None) -> tuple[dict[str, float], float | None]:
    """One optimizer step over a window of micro-batches on every rank; returns the objective's summary over every
    rank ({"loss", "tokens", ...metrics}) and the grad norm. `runner` is what the forward goes through (DDP's
    wrapper; default the model); `objective` defaults to SFT's token loss."""
    runner = model if runner is None else runner
    objective = TokenLoss(model) if objective is None else objective
    device = window[0].input_ids.device
    totals = dist.all_sum(objective.totals(window), world, device)
    sums: dict[str, float] = {}
    for i, batch in enumerate(window):
        with dist.syncing(runner, strategy, sync=i == len(window) - 1):
            with autocast(cfg, device):
                loss, stats = objective.loss(runner, batch, totals)
            loss = loss * world.size  # DDP and FSDP average gradients over ranks: undo it (totals cover all ranks)
            (scaler.scale(loss) if scaler is not None else loss).backward()
        for name, value in stats.items():
            sums[name] = sums.get(name, 0.0) + value
        # The activations just freed go back before the next micro-batch allocates its own: in full runs. DPO, whose
        # reference pass frees as much again, trims once per window: trimming after every micro-batch cost its LoRA
        # runs 5 % of the step in faults on the returned pages (AVX512-BF16, in-process) to save 1.42 -> 1.38 GiB of
        # peak; a LoRA SFT peak is far lower, and there the trim costs more speed than the memory is worth.
        if cfg.method == "full" or (cfg.recipe == "dpo" and i == len(window) - 1):
            release_free_memory()
    if scaler is not None:
        scaler.unscale_(optimizer)
    grad_norm = None
    if cfg.max_grad_norm is not None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        grad_norm = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()  # a DTensor under FSDP
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    names = sorted(sums)
    sums = dict(zip(names, dist.all_sum([sums[n] for n in names], world, device), strict=True))
    return objective.summary(sums, totals), grad_norm


def autocast(cfg: TrainConfig, device: torch.device):
    if cfg.precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if cfg.precision == "bf16-mixed" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def _due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def _evaluate_and_track(runner, model, objective, validation, cfg: TrainConfig, device, state: dict, metrics,
                        save_model, run_dir: Path, world: dist.World) -> bool:
    """Validation metrics over every rank's share (SFT: loss and perplexity; DPO: its loss and reward metrics;
    distill: its loss, kd_loss and ce_loss);
    keeps `best/` by val_loss; True when early stopping's patience has run out (the same answer on every rank:
    they all see the same summed loss)."""
    batches = validation_batches(validation, cfg.micro_batch_size, world.rank, world.size)
    reduce = lambda values: dist.all_sum(values, world, device)  # noqa: E731
    if isinstance(objective, TokenLoss):
        result = evaluate(model, batches, device, lambda: autocast(cfg, device), cfg.eval.max_batches, runner, reduce)
        log.info("step %d: val_loss %.4f, val_ppl %.2f", state["step"], result["val_loss"], result["val_ppl"])
    else:
        with autocast(cfg, device):
            result = evaluate_objective(objective, runner, batches, device, cfg.eval.max_batches, reduce)
        log.info("step %d: %s", state["step"], ", ".join(f"{name} {value:.4g}" for name, value in result.items()
                                                         if name != "val_tokens"))
    metrics.write(state["step"], result)
    if state["best"] is None or result["val_loss"] < state["best"]:
        state["best"], state["stale_evals"] = result["val_loss"], 0
        _save_model_dir(run_dir / "best", save_model, world)
        return False
    state["stale_evals"] += 1
    patience = cfg.eval.early_stopping_patience
    return patience > 0 and state["stale_evals"] >= patience


def _save_model_dir(target: Path, save_model, world: dist.World) -> Path:
    """best/ or final/, atomically: every rank takes part in gathering the weights, rank 0 writes."""
    if world.is_main:
        with atomic_dir(target, durable=True) as tmp:
            save_model(tmp)
    else:
        save_model(target)
    dist.barrier(world)
    return target


def _datasets(cfg: TrainConfig, tokenizer, world: dist.World):
    """Rank 0 tokenises (and fills the cache) first; the others then read the cache instead of racing to write it."""
    if not world.is_main:
        dist.barrier(world)
    data = build_datasets(cfg.data, tokenizer, cfg.seed)
    if world.is_main:
        dist.barrier(world)
    return data


def _record_state_memory(model, optimizer, world: dist.World, device, strategy: str, run_dir: Path) -> None:
    """Each rank's weight (parameters and buffers) and optimizer-state bytes (its shards under FSDP), after the
    first step has created the optimizer state: logged and written to RUN/memory.json by rank 0."""
    gib = 2**30
    mine = [dist.weight_bytes(model), dist.optimizer_bytes(optimizer)]
    everyone = [0.0] * (2 * world.size)
    everyone[2 * world.rank:2 * world.rank + 2] = mine
    everyone = dist.all_sum(everyone, world, device)
    for rank in range(world.size):
        log.info("rank %d (%s): weights %.3f GiB, optimizer state %.3f GiB", rank, strategy,
                 everyone[2 * rank] / gib, everyone[2 * rank + 1] / gib)
    if world.is_main:
        ranks = [{"weight_bytes": int(everyone[2 * r]), "optimizer_bytes": int(everyone[2 * r + 1])}
                 for r in range(world.size)]
        (run_dir / "memory.json").write_text(json.dumps({"strategy": strategy, "ranks": ranks}, indent=2) + "\n")


def _resume_from(cfg: TrainConfig, run_dir: Path) -> Path | None:
    if cfg.checkpoint.resume == "never":
        return None
    if cfg.checkpoint.resume == "auto":
        found = ckpt.checkpoints(run_dir)
        return found[-1] if found else None
    return Path(cfg.checkpoint.resume)
