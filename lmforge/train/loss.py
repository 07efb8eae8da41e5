"""Next-token cross-entropy summed over trained tokens, computed chunk by chunk so the [tokens, vocab] logits of a
whole micro-batch never exist at once (they would be the largest tensor of a step: 2048 x 49152 x 4 bytes).

The caller divides the sum by the trained tokens of the whole accumulation window, so every token weighs the
same however the window's micro-batches are sized."""

import torch
import torch.nn.functional as F
from torch import nn

from lmforge import kernels
from lmforge.data.dataset import IGNORE_INDEX
from lmforge.layers.linear import Linear, frozen_pack
from lmforge.layers.train_kernels import f32_product

CHUNK_ROWS = 512  # a chunk's fp32 logits: 512 x 49152 x 4 bytes = 100 MB for SmolLM2
VOCAB_SLICE = 4096  # rows of a trained head's gradient summed at a time: a [4096, hidden] product, not [vocab, hidden]


def token_loss_sum(model: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """sum over rows with labels != IGNORE_INDEX of -log p(label | row); hidden [T, H] from the model, labels [T]."""
    rows = (labels != IGNORE_INDEX).nonzero().squeeze(1)
    hidden, labels = hidden.index_select(0, rows), labels.index_select(0, rows)
    head = model.lm_head
    if torch.is_grad_enabled() and type(head) is Linear and head.bias is None:
        return _LinearCrossEntropy.apply(hidden, head.weight, labels, _compute_dtype(hidden))
    # evaluation, or an adapted / trained-copy head (LoRA, modules_to_save): its own forward, chunked by rows
    total = hidden.new_zeros((), dtype=torch.float32)
    for h, y in zip(hidden.split(CHUNK_ROWS), labels.split(CHUNK_ROWS), strict=True):
        total = total + F.cross_entropy(model.logits(h), y, reduction="sum")
    return total


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class _LinearCrossEntropy(torch.autograd.Function):
    """Projection to the vocabulary fused with cross-entropy. The forward already computes the gradients for
    hidden (and the head weight, when trained) chunk by chunk, since the loss is a sum and backward only scales
    them: the same matrix products as unfused autograd, without keeping any chunk's logits."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            want_w = weight.requires_grad
            grad_h = torch.empty_like(hidden)
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
            # one buffer for every chunk's product: a fresh [vocab, hidden] tensor per chunk costs its page faults
            product = torch.empty(weight.shape, dtype=dtype, device=weight.device) if want_w else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            ops = _ops(dtype, hidden)
            for start, h, y in _chunks(hidden, labels, dtype):
                losses, g = _rows_cross_entropy(f32_product(h, w), y, ops)
                total += losses.sum()
                grad_h[start:start + CHUNK_ROWS] = (g @ w).to(hidden.dtype)
                if want_w:
                    torch.mm(g.t(), h, out=product)
                    _accumulate(grad_w, product, ops)
        ctx.save_for_backward(grad_h, grad_w if want_w else torch.empty(0))
        ctx.want_w, ctx.weight_dtype, ctx.used = want_w, weight.dtype, False
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        if ctx.used:  # the products below are scaled in place
            raise RuntimeError("the fused cross-entropy supports one backward pass per forward (no retain_graph)")
        ctx.used = True
        dh = grad_h.mul_(grad_out.to(grad_h.dtype))
        dw = grad_w.mul_(grad_out).to(ctx.weight_dtype) if ctx.want_w else None
        return dh, dw, None, None


class _LinearLogProbs(torch.autograd.Function):
    """log p(label | row) per row through the vocabulary projection, chunk by chunk, with the cross-entropy kernel.
    A frozen head: as in _LinearCrossEntropy the forward computes each row's gradient for its hidden state
    (d log p / d h = w[label] - softmax @ w) and backward scales row i by its incoming gradient, so no chunk's
    logits are kept or recomputed. A trained head's gradient sums rows whose scales are unknown until backward:
    there backward recomputes each chunk's logits (as activation checkpointing would)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype,
                entropies: torch.Tensor | None, packed: torch.Tensor | None = None) -> torch.Tensor:
        want_h, want_w = ctx.needs_input_grad[:2]
        ahead = want_h and not want_w  # the hidden states' gradient, computed now
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            grad_h = torch.empty_like(hidden) if ahead else None
            logps = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
            ops = _ops(dtype, hidden)
            for start, h, y in _chunks(hidden, labels, dtype):
                logits = f32_product(h, w) if packed is None else ops.vnni_linear(h.contiguous(), packed, None)
                if entropies is not None:
                    entropies[start:start + len(y)] = row_entropy(logits)
                losses, g = _rows_cross_entropy(logits, y, ops)
                logps[start:start + len(y)] = -losses
                if ahead:
                    grad_h[start:start + len(y)] = (g @ w).neg_().to(hidden.dtype)
        ctx.save_for_backward(*((grad_h,) if ahead else (hidden, weight, labels)))
        ctx.dtype, ctx.want_h, ctx.used = dtype, want_h, False
        return logps

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        if ctx.used:  # the saved products are scaled in place
            raise RuntimeError("the fused log-probs support one backward pass per forward (no retain_graph)")
        ctx.used = True
        if len(ctx.saved_tensors) == 1:
            (grad_h,) = ctx.saved_tensors
            return grad_h.mul_(grad_out.to(grad_h.dtype)[:, None]), None, None, None, None, None
        hidden, weight, labels = ctx.saved_tensors
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(ctx.dtype)
            grad_h = torch.empty_like(hidden) if ctx.want_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            ops = _ops(ctx.dtype, hidden)
            product = None  # one slice's g^T h, reused: this backward runs while the step's activations peak
            for start, h, y in _chunks(hidden, labels, ctx.dtype):
                _, g = _rows_cross_entropy(f32_product(h, w), y, ops)
                g.mul_(grad_out[start:start + len(y), None].neg().to(g.dtype))  # d(sum out * grad_out) / d logits
                if ctx.want_h:
                    grad_h[start:start + len(y)] = (g @ w).to(hidden.dtype)
                for v in range(0, weight.shape[0], VOCAB_SLICE):
                    rows = g.t()[v:v + VOCAB_SLICE]
                    if product is None or product.shape[0] != rows.shape[0]:
                        product = torch.empty(rows.shape[0], h.shape[1], dtype=g.dtype, device=g.device)
                    torch.mm(rows, h, out=product)
                    _accumulate(grad_w[v:v + VOCAB_SLICE], product, ops)
        return grad_h, grad_w.to(weight.dtype), None, None, None, None


def linear_log_probs(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor,
                     entropies: torch.Tensor | None = None) -> torch.Tensor | None:
    """log p(label | row) per row of hidden [R, H], fused (_LinearLogProbs), or None where the head is not a plain
    linear layer (adapted by LoRA, or with a bias): the caller then runs the head itself. `entropies` [R], when
    given, receives each row's entropy (row_entropy) from the same logits."""
    if type(head) is not Linear or head.bias is not None:
        return None
    dtype = _compute_dtype(hidden)
    packed = frozen_pack(head) if dtype == head.weight.dtype else None  # a training run's packed copy, if any
    return _LinearLogProbs.apply(hidden, head.weight, labels, dtype, entropies, packed)


@torch.no_grad()
def row_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The entropy of softmax(logits / temperature) per row, in float32, without gradient (TRL's `entropy`)."""
    x = logits.detach().float()
    x = x / temperature if temperature != 1 else x
    lse = x.logsumexp(-1)
    return lse - (x - lse[:, None]).exp_().mul_(x).sum(-1)


def _chunks(hidden: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype):
    for start in range(0, hidden.shape[0], CHUNK_ROWS):
        yield start, hidden[start:start + CHUNK_ROWS].to(dtype), labels[start:start + CHUNK_ROWS]


def _accumulate(dst: torch.Tensor, src: torch.Tensor, ops) -> None:
    """float32 dst += src in place: the kernel where there is one (torch's mixed-dtype add_ first copies a bf16 src to
    float32), else add_."""
    if ops is not None:
        ops.accumulate_(dst, src)
    else:
        dst.add_(src)


def _ops(dtype: torch.dtype, x: torch.Tensor):
    return kernels.available(x.device) if dtype in (torch.float32, torch.bfloat16) else None


def _rows_cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                        ops) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's cross-entropy (float32) and d(it)/d(logits) = softmax - onehot in the logits' dtype; `logits`
    is overwritten where it can be. `ops`: the CPU kernels (one sweep per row in cache), or None."""
    if ops is not None:
        return ops.cross_entropy_(logits, labels), logits
    losses, g = _cross_entropy(logits, labels)
    return losses, g.to(logits.dtype)


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The cross-entropy of each logit row and d(it)/d(logits) = softmax - onehot, in float32 (what the kernel
    cross_entropy_ computes in one sweep per row); a float32 `logits` is overwritten."""
    logits = logits.float()
    target = logits.gather(1, labels[:, None]).squeeze(1)
    top = logits.amax(dim=1, keepdim=True)
    # one exp per logit (torch.logsumexp and a second exp made the loss slower on CPU: docs/benchmarks.md, issue 5);
    # logits far below the max are clamped first, where exp leaves its fast path, since e^-80 is nothing beside the
    # max's e^0
    probs = logits.sub_(top).clamp_min_(-80.0).exp_()
    sums = probs.sum(dim=1, keepdim=True)
    losses = (top + sums.log()).squeeze(1).sub_(target)
    probs.div_(sums)
    probs[torch.arange(len(labels), device=labels.device), labels] -= 1
    return losses, probs
