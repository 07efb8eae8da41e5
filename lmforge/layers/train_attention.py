"""Causal self-attention under autograd on a CPU with AMX: torch's flash-attention forward, lmforge's backward.

torch's CPU flash-attention backward takes about six times its forward (its block products do not use the AMX
tiles), a quarter of a LoRA step on SmolLM2. The kernel `attention_backward` (lmforge/kernels/cpu_ops.cpp) runs the
same recurrence from the same saved tensors (q, k, v, the output and its log-sum-exp) on the tiles.
"""

import torch

from lmforge import kernels

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def trained_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor | None:
    """q [B, L, H, D], k/v [B, L, KVH, D] -> [B, L, H, D] attended causally, or None where the kernel does not apply
    (no autograd, not bf16, no AMX, a head size that is not a multiple of 32): the caller then uses SDPA."""
    if not torch.is_grad_enabled() or not (q.requires_grad or k.requires_grad or v.requires_grad):
        return None
    if not q.dtype == k.dtype == v.dtype == torch.bfloat16 or q.shape[-1] % 32 or q.shape[1] < 2:
        return None
    ops = kernels.available(q.device)
    if ops is None or not ops.amx_available():
        return None
    return _CausalAttention.apply(q, k, v, scale)


class _CausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        out, lse = _flash(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, True, attn_mask=None,
                          scale=scale)
        out = out.transpose(1, 2)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        grad = grad if grad.stride(-1) == 1 else grad.contiguous()
        dq, dk, dv = kernels.cpu_ops().attention_backward(q, k, v, out, grad.to(q.dtype), lse, ctx.scale)
        return dq, dk, dv, None
