"""Autograd Functions whose forward and backward run lmforge's CPU kernels (lmforge/kernels/training.cpp,
attention_backward.cpp, linear.cpp, linear_bf16.cpp): causal attention, RMSNorm, rotary embedding and SwiGLU, the ops
of a training step that eager autograd runs as chains of small element-wise passes (or, for attention, through
torch's slow bf16 backward), the forward product of float32 linears on CPUs without AVX512, and that of frozen bf16
linears on the packed AVX512-BF16 GEMM.
Each returns None where it does not apply (autograd not recording, another device or dtype, kernels off): the layer
then runs its eager code, which stays the reference the tests compare against (tests/unit/test_kernels.py).
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F

from lmforge import kernels
from lmforge.hardware import cpu_flags
from lmforge.layers.varlen import prefix_sources

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
_KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def _ops(*tensors: torch.Tensor):
    """The kernels when autograd records an op on these tensors (CPU, float32/bfloat16), else None. Under
    kernels.training_forward or kernels.bitwise also when it does not: a reference pass, or an engine's forward,
    then runs the training forward's kernels."""
    if not kernels.in_training_forward() and (not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors)):
        return None
    if any(t.dtype not in _KERNEL_DTYPES for t in tensors):
        return None
    return kernels.available(tensors[0].device)


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


# ---------------------------------------------------------------- attention


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor | None:
    """q [B, L, H, D], k/v [B, L, KVH, D] -> [B, L, H, D] attended causally in bf16: torch's flash-attention forward
    and, with AMX, the kernel `attention_backward` for head sizes that are multiples of 32 (torch's own CPU backward
    takes about six times its forward: its block products do not use the tiles); without AMX torch's flash backward
    run in float32 on upcast copies, 1.2-2.7x faster than its bf16 one on a training step's shapes and closer to
    float64 (AMD EPYC with AVX512-BF16, 2 threads: docs/benchmarks.md). None when SDPA computes in float32."""
    if (ops := _ops(q, k, v)) is None or q.shape[1] < 2:
        return None
    dtype = _autocast_dtype(q.device) or q.dtype  # what SDPA would compute in
    if dtype != torch.bfloat16:
        return None
    if not ops.amx_available():
        return _Float32Backward.apply(q.to(dtype), k.to(dtype), v.to(dtype), scale)
    if q.shape[-1] % 32 or q.shape[0] * k.shape[2] * 4 < torch.get_num_threads():  # one task per (sequence, kv
        return None  # head): on many cores with few tasks, torch's backward (parallel over query blocks too) wins
    return _CausalAttention.apply(q.to(dtype), k.to(dtype), v.to(dtype), scale)


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
        grad = grad.to(q.dtype)
        grad = grad if grad.stride(-1) == 1 else grad.contiguous()
        dq, dk, dv = kernels.cpu_ops().attention_backward(q, k, v, out, grad, lse, ctx.scale)
        return dq, dk, dv, None


class _Float32Backward(torch.autograd.Function):
    """Torch's flash attention: the forward in bf16, the backward in float32 (inputs, output and gradient upcast;
    the gradients rounded back to bf16 once)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        out, lse = _flash(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, True, attn_mask=None,
                          scale=scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out.transpose(1, 2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        heads_first = [x.transpose(1, 2).float() for x in (grad, q, k, v)]
        grads = _flash_backward(*heads_first, out.float(), lse, 0.0, True, attn_mask=None, scale=ctx.scale)
        return *(g.transpose(1, 2).to(x.dtype) for g, x in zip(grads, (q, k, v), strict=True)), None


def kernel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: tuple[int, ...],
                     prefixes: tuple[int, ...] | None, scale: float, window: int | None,
                     reference: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
                     ) -> torch.Tensor | None:
    """Bitwise mode (kernels.bitwise), float32: packed documents (q [T, H, D], k/v [T, KVH, D], `lens` end to end,
    each after the first prefixes[i] tokens of its prefix source, varlen.prefix_sources) attended by the paged-
    attention kernel a serving engine runs, so that every query sums its keys in the engine's order. The flat keys
    and values are read as a cache of one-token blocks, each document's block table listing its prefix's rows, then
    its own. Backward differentiates `reference(q, k, v)` (the same attention on torch's path), recomputed."""
    if not kernels.in_bitwise() or q.dtype != torch.float32 or kernels.available(q.device) is None:
        return None
    prefixes = prefixes or (0,) * len(lens)
    starts = [0]
    for n in lens:
        starts.append(starts[-1] + n)
    rows = []
    for i, (n, p, owner) in enumerate(zip(lens, prefixes, prefix_sources(prefixes), strict=True)):
        own = list(range(starts[i], starts[i] + n))
        rows.append(list(range(starts[owner], starts[owner] + p)) + own if p else own)
    tables = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
    for i, r in enumerate(rows):
        tables[i, :len(r)] = torch.tensor(r)
    cu = torch.tensor(starts, dtype=torch.long)
    lens_k = torch.tensor([len(r) for r in rows], dtype=torch.long)
    return _KernelAttention.apply(q, k, v, (cu, lens_k, tables), scale, window, reference)


class _KernelAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, layout, scale, window, reference):
        cu, lens_k, tables = layout
        out = torch.empty(q.shape, dtype=q.dtype)
        cache = [x.contiguous().view(x.shape[0], 1, *x.shape[1:]) for x in (k, v)]  # one token per block
        kernels.cpu_ops().paged_attention(q.contiguous(), *cache, cu, lens_k, tables, torch.arange(len(lens_k)),
                                          scale, window or 0, out)
        ctx.save_for_backward(q, k, v)
        ctx.reference = reference
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        inputs = [x.detach().requires_grad_() for x in ctx.saved_tensors]
        with torch.enable_grad(), kernels.disabled():
            grads = torch.autograd.grad(ctx.reference(*inputs), inputs, grad)
        return *grads, None, None, None, None


# ---------------------------------------------------------------- RMSNorm


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """RMSNorm as lmforge/layers/norm.py computes it (float32 inside; under autocast the output in the autocast dtype,
    else in x's), for x [..., dim]."""
    if _ops(x, weight) is None:
        return None
    out_dtype = _autocast_dtype(x.device) or x.dtype
    if out_dtype not in _KERNEL_DTYPES or (out_dtype == x.dtype and weight.dtype != x.dtype):
        return None
    return _RMSNorm.apply(x, weight, eps, out_dtype)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).contiguous()
        w = weight.to(out_dtype).contiguous()
        y, inv = kernels.cpu_ops().rms_norm_train(rows, w, eps)
        ctx.save_for_backward(rows, w, inv)
        ctx.shape, ctx.weight_dtype = x.shape, weight.dtype
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        rows, w, inv = ctx.saved_tensors
        dy = grad.reshape(rows.shape).to(w.dtype).contiguous()
        dx, dw = kernels.cpu_ops().rms_norm_train_backward(dy, rows, w, inv, ctx.needs_input_grad[1])
        return dx.view(ctx.shape), dw.to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None, None, None


# ---------------------------------------------------------------- rotary embedding


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """x [T, heads, head_dim] rotated on its first cos.shape[-1] features (half-split layout), in float32 with one
    rounding. The output takes the autocast dtype under autocast (attention, its only reader, computes in it), else
    the promoted dtype of x and cos, as eager's products would."""
    if x.dim() != 3 or x.stride(-1) != 1 or _ops(x, cos) is None:
        return None
    out_dtype = _autocast_dtype(x.device) or torch.promote_types(x.dtype, cos.dtype)
    if out_dtype not in _KERNEL_DTYPES:
        return None
    return _Rope.apply(x, cos.float().contiguous(), sin.float().contiguous(), out_dtype)


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        ctx.in_dtype = x.dtype
        return kernels.cpu_ops().rope_train(x, cos, sin, False, out_dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cos, sin = ctx.saved_tensors
        grad = grad if grad.stride(-1) == 1 else grad.contiguous()
        return kernels.cpu_ops().rope_train(grad, cos, sin, True, ctx.in_dtype), None, None, None


# ---------------------------------------------------------------- SwiGLU


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor | None:
    """silu(gate) * up for [T, n] halves of one dtype; keeps gate and up for backward (eager also keeps silu(gate))."""
    return _SiluMul.apply(gate, up) if silu_mul_usable(gate, up) is not None else None


def silu_mul_usable(gate: torch.Tensor, up: torch.Tensor):
    """The kernels where silu_mul takes these halves, else None."""
    if gate.dim() != 2 or gate.dtype != up.dtype or gate.stride(-1) != 1 or up.stride(-1) != 1:
        return None
    return _ops(gate, up)


class _SiluMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return kernels.cpu_ops().silu_mul(gate, up)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        grad = grad.to(gate.dtype)
        grad = grad if grad.stride(-1) == 1 else grad.contiguous()
        dgate, dup = kernels.cpu_ops().silu_mul_backward(gate, up, grad)
        return dgate, dup


# ---------------------------------------------------------------- float32 linear


def f32_product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight^T for float32 x [M, K] and a contiguous weight [N, K]: the AVX2 kernel `linear_f32` on CPUs
    without AVX512, else torch's product. There torch hands the transposed weight to MKL, whose product of a training
    step's MLP and vocabulary shapes ran at 47-58 GFLOP/s where linear_f32 ran at 64-68 (AMD EPYC, AVX2, 2 threads;
    docs/benchmarks.md); on AVX512 CPUs MKL's own code is unmeasured against it and stays."""
    if (ops := _f32_kernel(x, weight)) is not None:
        return ops.linear_f32(x.contiguous(), weight, None)
    return x @ weight.t()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """F.linear in float32 with its forward product from `f32_product`, where that is not torch's own; backward is
    torch's products. None elsewhere (no autograd recording, autocast, other dtypes): the caller runs F.linear."""
    if _autocast_dtype(x.device) is not None or _ops(x, weight) is None or _f32_kernel(x, weight) is None:
        return None
    out = _Linear.apply(x.reshape(-1, x.shape[-1]), weight, bias)  # views made out here: callers may add in place
    return out if x.dim() == 2 else out.view(*x.shape[:-1], weight.shape[0])


def mixed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """F.linear under CPU bf16 autocast for a float32 weight that is trained (full fine-tuning in bf16-mixed), the
    same products as autocast's, without keeping the weight's bf16 copy from forward to backward: autocast caches
    every such cast until its context ends and saves it for backward, a second copy of the decoder (half its float32
    bytes) alive through the step's peak; here backward casts the weight again (a few ms per step). None elsewhere."""
    return _MixedLinear.apply(x, weight, bias) if _mixed(x, weight, bias) else None


def _mixed(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    if _autocast_dtype(x.device) != torch.bfloat16 or x.device.type != "cpu" or weight.dtype != torch.float32:
        return False
    if not weight.requires_grad or not torch.is_grad_enabled():
        return False
    return bias is None or bias.dtype == torch.float32


def silu_mul_linear(gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor,
                    bias: torch.Tensor | None) -> torch.Tensor | None:
    """down(silu(gate) * up) in mixed_linear's case (a trained float32 down weight under CPU bf16 autocast) for bf16
    halves: the same kernels and products as silu_mul then mixed_linear, but silu(gate) * up is recomputed in
    backward rather than kept, one [tokens, intermediate] activation per layer less (55 MB for 600 tokens of
    SmolLM2) for one more element-wise pass. None elsewhere."""
    if gate.dtype != torch.bfloat16 or silu_mul_usable(gate, up) is None or not _mixed(gate, weight, bias):
        return None
    return _SiluMulLinear.apply(gate, up, weight, bias)


class _SiluMulLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(gate, up, weight)
        ctx.biased = bias is not None
        return _cast_linear(kernels.cpu_ops().silu_mul(gate, up), weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        gate, up, weight = ctx.saved_tensors
        ops = kernels.cpu_ops()
        dh, dw, db = _cast_linear_grads(grad, ops.silu_mul(gate, up), weight, (True, *ctx.needs_input_grad[2:]),
                                        ctx.biased)
        dgate, dup = ops.silu_mul_backward(gate, up, dh)
        return dgate, dup, dw, db


class _MixedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x = x.to(torch.bfloat16)
        ctx.save_for_backward(x, weight)
        ctx.biased = bias is not None
        return _cast_linear(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        return _cast_linear_grads(grad, x, weight, ctx.needs_input_grad, ctx.biased)


def _cast_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear of bf16 x on the float32 weight (and bias) cast to bf16 for this call only."""
    with torch.autocast("cpu", enabled=False):
        return F.linear(x, weight.to(torch.bfloat16), None if bias is None else bias.to(torch.bfloat16))


def _cast_linear_grads(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, wanted, biased: bool):
    """_cast_linear's gradients (input, weight, bias) as autocast's products give them, the weight cast again;
    `wanted` as ctx.needs_input_grad."""
    grad = grad.to(torch.bfloat16)
    rows, grads = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
    with torch.autocast("cpu", enabled=False):
        dx = grad.matmul(weight.to(torch.bfloat16)) if wanted[0] else None
        dw = grads.t().mm(rows).float() if wanted[1] else None
        db = grads.sum(0).float() if biased and wanted[2] else None
    return dx, dw, db


def _f32_kernel(x: torch.Tensor, weight: torch.Tensor):
    """The kernels when `linear_f32` takes x @ weight^T: float32 on a CPU without AVX512 (on any in bitwise mode,
    where an engine's float32 products run it too), a contiguous weight."""
    if x.dtype != torch.float32 or weight.dtype != torch.float32 or not weight.is_contiguous():
        return None
    if _avx512() and not kernels.in_bitwise():
        return None
    ops = kernels.available(x.device)
    return ops if ops is not None and ops.linear_f32_available() else None


def _avx512() -> bool:
    return "avx512f" in cpu_flags()


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x if weight.requires_grad else None, weight)  # a frozen weight needs no input
        ctx.biased = bias is not None
        out = f32_product(x, weight)
        if bias is not None:
            out += bias
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        rows, weight = ctx.saved_tensors
        dx = grad.mm(weight) if ctx.needs_input_grad[0] else None
        dw = grad.t().mm(rows) if ctx.needs_input_grad[1] else None
        db = grad.sum(0) if ctx.biased and ctx.needs_input_grad[2] else None
        return dx, dw, db


# ---------------------------------------------------------------- frozen bf16 linear


def packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  packed: torch.Tensor) -> torch.Tensor:
    """F.linear for bf16 x [M, K] and a frozen bf16 weight [N, K] (and bias) whose `vnni_pack` copy is `packed`
    (layers/linear.py keeps it): the forward product on the AVX512-BF16 GEMM `vnni_linear`, which sums each output
    in the same order whatever the rows (the reference pass, run on it too, gets the policy's products); backward
    gives the input's gradient only, grad @ weight on torch's product (a packed transposed copy would cost the
    weight's bytes again for a 0.4-1.8 % faster step: docs/benchmarks.md)."""
    return _PackedLinear.apply(x, weight, bias, packed)


class _PackedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                packed: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return kernels.cpu_ops().vnni_linear(x.contiguous(), packed, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        dx = grad.to(weight.dtype).mm(weight) if ctx.needs_input_grad[0] else None
        return dx, None, None, None
