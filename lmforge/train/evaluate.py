"""Validation: token-weighted mean loss and perplexity over a dataset's micro-batches, without gradients."""

import contextlib
import math
from collections.abc import Callable, Iterable

import torch

from lmforge.layers.attention import AttnMeta
from lmforge.layers.lora import lora_disabled
from lmforge.train.loss import token_loss_sum
from lmforge.train.preference import sequence_logps


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable, device: torch.device, autocast: Callable,
             max_batches: int | None = None, runner: torch.nn.Module | None = None,
             reduce: Callable[[list[float]], list[float]] | None = None) -> dict:
    """{"val_loss", "val_ppl", "val_tokens"} over the batches (each with input_ids, positions, cu_seqlens, labels).
    In a distributed run each rank passes its share, `runner` (DDP's wrapper, or the FSDP-sharded model) and
    `reduce`, the sum over ranks of the loss and token totals."""
    runner = model if runner is None else runner
    was_training = runner.training
    runner.eval()
    total, tokens = 0.0, 0
    try:
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            with autocast():
                hidden = runner(batch.input_ids.to(device), batch.positions.to(device),
                               AttnMeta.for_training(batch.cu_seqlens.to(device), batch.prefix_lens))
                total += token_loss_sum(model, hidden, batch.labels.to(device)).item()
            tokens += batch.num_trained_tokens
    finally:
        runner.train(was_training)
    if reduce is not None:
        total, tokens = reduce([total, tokens])
        tokens = int(tokens)
    loss = total / max(tokens, 1)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": tokens}


@torch.no_grad()
def evaluate_objective(objective, runner: torch.nn.Module, batches: list, device: torch.device,
                       max_batches: int | None = None,
                       reduce: Callable[[list[float]], list[float]] | None = None) -> dict:
    """A recipe objective's summary over the batches without gradients, every metric prefixed val_ (the
    preference recipe's validation: its loss and reward metrics over all held-out pairs)."""
    batches = [b.to(device) for b in batches[:max_batches]]
    reduce = reduce or (lambda values: values)
    was_training = runner.training
    runner.eval()
    try:
        totals = reduce(objective.totals(batches))
        sums: dict[str, float] = {}
        for batch in batches:
            for name, value in objective.loss(runner, batch, totals)[1].items():
                sums[name] = sums.get(name, 0.0) + value
    finally:
        runner.train(was_training)
    names = sorted(sums)
    summary = objective.summary(dict(zip(names, reduce([sums[n] for n in names]), strict=True)), totals)
    return {f"val_{name}": value for name, value in summary.items()}


@torch.no_grad()
def pair_rewards(model: torch.nn.Module, batches: Iterable, device: torch.device,
                 reference: torch.nn.Module | str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Implicit rewards (without beta) of the chosen and rejected answer of every pair in the batches of a
    PairDataset: log p_model - log p_reference of the answer, where the reference is "adapters-off" (the model's own
    base: LoRA layers switched off), another model, or None: then the answer's mean token log-prob (SimPO's
    reference-free reward, which does not favour short answers)."""
    chosen, rejected = [], []
    for batch in batches:
        batch = batch.to(device)
        meta = AttnMeta.for_training(batch.cu_seqlens, batch.prefix_lens)
        logps, counts = sequence_logps(model, model(batch.input_ids, batch.positions, meta), batch.labels,
                                       batch.cu_seqlens)
        if reference is None:
            rewards = logps / counts.clamp(min=1)
        else:
            base = model if reference == "adapters-off" else reference
            with lora_disabled(model) if reference == "adapters-off" else contextlib.nullcontext():
                hidden = base(batch.input_ids, batch.positions, meta)
                rewards = logps - sequence_logps(base, hidden, batch.labels, batch.cu_seqlens)[0]
        chosen.append(rewards[0::2])
        rejected.append(rewards[1::2])
    return torch.cat(chosen), torch.cat(rejected)


def load_evaluated_model(spec: str, model_dir, adapter: str | None, dtype: torch.dtype, device: torch.device,
                         quantization: str | None = None) -> torch.nn.Module:
    """The model `lmforge eval` scores: `spec`'s weights as the engine serves them (quantised linears if asked),
    with the PEFT adapter's LoRA layers when given (unmerged)."""
    from lmforge.weights.peft import load_adapter
    from lmforge.weights.quantized import load_for_serving

    model, _ = load_for_serving(spec, model_dir, quantization, dtype, str(device))
    if adapter:
        load_adapter(model, adapter)
    return model.eval()
