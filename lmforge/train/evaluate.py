"""Validation: token-weighted mean loss and perplexity over a dataset's micro-batches, without gradients."""

import math
from collections.abc import Callable, Iterable

import torch

from lmforge.layers.attention import AttnMeta
from lmforge.train.loss import token_loss_sum


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
                               AttnMeta.for_training(batch.cu_seqlens.to(device)))
                total += token_loss_sum(model, hidden, batch.labels.to(device)).item()
            tokens += batch.num_trained_tokens
    finally:
        runner.train(was_training)
    if reduce is not None:
        total, tokens = reduce([total, tokens])
        tokens = int(tokens)
    loss = total / max(tokens, 1)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": tokens}


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
