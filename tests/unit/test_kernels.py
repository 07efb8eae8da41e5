"""The CPU kernels (lmforge/kernels) against the pure-torch code they replace, in float32 and bfloat16."""

import contextlib

import pytest
import torch
import torch.nn.functional as F

from lmforge import kernels
from lmforge.layers.attention import AttnMeta, attention
from lmforge.layers.linear import DerivedWeights, Linear, _onednn_packing, frozen_pack, frozen_packs
from lmforge.layers.mlp import swiglu
from lmforge.layers.norm import RMSNorm
from lmforge.layers.rope import apply_rope

pytestmark = pytest.mark.skipif(kernels.cpu_ops() is None, reason="CPU kernels unavailable (no C++ compiler?)")
DTYPES = [torch.float32, torch.bfloat16]
BF16_ULP = 2**-7  # relative spacing of bfloat16 values: kernels may round once differently from eager


@pytest.fixture(autouse=True, params=kernels.levels())
def level(request):
    """Every test runs on each build this CPU executes (native, avx2, portable): an AVX512 host tests the AVX2 path."""
    with kernels.level(request.param):
        yield request.param


def close(actual, expected, dtype, atol=1e-5):
    if dtype == torch.float32:
        torch.testing.assert_close(actual, expected, atol=atol, rtol=1e-5)
    else:
        torch.testing.assert_close(actual.float(), expected.float(), atol=BF16_ULP, rtol=BF16_ULP)


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 33, 64, 130])
@pytest.mark.parametrize("bias", [False, True])
# 80 x 48: no AMX tiling (the AVX512-BF16 GEMM, or oneDNN); 96 x 64: AMX if present; 81 x 40: packed by oneDNN only
@pytest.mark.parametrize("shape", [(80, 48), (96, 64), (81, 40)])
def test_linear_fast_paths_match_f_linear(rows, bias, shape):
    torch.manual_seed(0)
    layer = Linear(*shape, bias=bias).to(torch.bfloat16)
    x = torch.randn(rows, shape[0], dtype=torch.bfloat16)
    expected = (x.float() @ layer.weight.float().T + (layer.bias.float() if bias else 0))
    derived = DerivedWeights()  # an engine's: where the packed copy is kept
    with torch.inference_mode(), derived.active():
        close(layer(x), expected.to(torch.bfloat16), torch.bfloat16)
    ops = kernels.cpu_ops()
    layouts = {"amx"} if ops.amx_available() and shape == (96, 64) else \
        {"vnni"} if not ops.amx_available() and ops.vnni_available() and shape != (81, 40) else \
        {"onednn"} if _onednn_packing() else {None}
    packed = derived.packs[layer]._packed
    assert (packed[1] if packed else None) in layouts
    assert not hasattr(layer, "_packed")  # kept by the engine, not written onto the module


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 64, 67, 130])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(80, 48), (77, 50), (8, 3), (1536, 65)])  # k not a multiple of 8, n of 3
def test_float32_linear_matches_f_linear_whatever_the_batch(rows, bias, shape):
    """float32 products: the AVX2 kernel sums each output in an order that does not depend on the row count (a row
    alone equals the same row in any batch, bit for bit) and agrees with F.linear to float32 rounding; builds
    without AVX2 run ATen's own product (the `linear` kernel), F.linear's bits."""
    torch.manual_seed(0)
    layer = Linear(*shape, bias=bias)
    x = torch.randn(rows, shape[0])
    with torch.inference_mode():
        out, expected = layer(x), F.linear(x, layer.weight, layer.bias)
        if not kernels.cpu_ops().linear_f32_available():
            assert torch.equal(out, expected)
            return
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        for i in {0, rows // 2, rows - 1}:
            assert torch.equal(layer(x[i:i + 1]), out[i:i + 1])
            assert torch.equal(layer(x[i:]), out[i:])


@pytest.mark.parametrize("rows", [1, 7, 8, 13, 64, 300])  # 300: three blocks of rows
@pytest.mark.parametrize("outputs", [48, 64, 80, 96, 208])  # whole 48-output panels and 16 / 32-output tails
def test_vnni_gemm_is_as_accurate_as_f_linear(rows, outputs):
    """The AVX512-BF16 GEMM against float64: its error is F.linear's own bf16 error (one rounding of the output,
    float32 sums in another order), whatever the rows' tile remainder and the last panel's width."""
    ops = kernels.cpu_ops()
    if ops is None or not ops.vnni_available():  # this level's build (the lower ones have no AVX512-BF16 loops)
        pytest.skip("needs AVX512-BF16 in the kernels' build")
    torch.manual_seed(rows * outputs)
    x, w, b = (torch.randn(*shape, dtype=torch.bfloat16) for shape in ((rows, 70), (outputs, 70), (outputs,)))
    reference = x.double() @ w.double().T + b.double()
    packed = ops.vnni_pack(w)
    for bias in (b, None):
        got = ops.vnni_linear(x, packed, bias).double()
        expected = reference if bias is not None else reference - b.double()
        own = (F.linear(x, w, bias).double() - expected).abs().max()
        assert (got - expected).abs().max() <= own + BF16_ULP * expected.abs().max() * 0.01
    with pytest.raises(RuntimeError, match="vnni_linear"):
        ops.vnni_linear(x[:, :64].contiguous(), packed, None)  # a K the packed weight was not made for


def test_packed_weight_follows_in_place_updates():
    layer = Linear(32, 16, bias=False).to(torch.bfloat16)
    x = torch.randn(8, 32, dtype=torch.bfloat16)
    derived = DerivedWeights()
    with torch.inference_mode(), derived.active():
        before = layer(x)
    with torch.no_grad():
        layer.weight.mul_(2)  # what an optimizer step or an RL weight sync does
    with torch.inference_mode(), derived.active():
        close(layer(x), before * 2, torch.bfloat16)


def test_linear_under_autograd_takes_f_linear():
    layer = Linear(16, 4).to(torch.bfloat16)
    x = torch.randn(2, 16, dtype=torch.bfloat16)
    derived = DerivedWeights()
    with derived.active():
        layer(x).float().sum().backward()
    assert layer.weight.grad is not None and derived.packs[layer]._packed is None


@pytest.mark.parametrize("rows", [1, 9, 130])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])  # float32: under bf16 autocast
def test_frozen_bf16_linear_runs_the_packed_gemm_under_autograd(rows, bias, x_dtype):
    """A frozen bf16 weight (LoRA's base) with a training run's packs (frozen_packs): the forward product on the
    AVX512-BF16 GEMM and the input's gradient equal float32 math on the same bf16 inputs within bf16 rounding,
    on the packed path where this level's build has that GEMM and no AMX (checked: never silently skipped), on
    F.linear elsewhere (the lower levels this host also runs)."""
    torch.manual_seed(rows)
    layer = Linear(96, 80, bias=bias).to(torch.bfloat16).requires_grad_(False)
    x = torch.randn(rows, 96, dtype=x_dtype, requires_grad=True)
    grad = torch.randn(rows, 80, dtype=torch.bfloat16)
    ops = kernels.cpu_ops()
    packs = frozen_packs(layer)
    assert (packs is not None) == (ops.vnni_available() and not ops.amx_available())
    with (packs.active() if packs is not None else contextlib.nullcontext()), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=x_dtype != torch.bfloat16):
        out = layer(x)
    out.backward(grad)
    assert out.dtype == torch.bfloat16 and x.grad.dtype == x_dtype
    w = layer.weight.float()
    xb = x.detach().to(torch.bfloat16).float()
    close(out, F.linear(xb, w, layer.bias.float() if bias else None), torch.bfloat16)
    close(x.grad.to(torch.bfloat16), grad.float() @ w, torch.bfloat16)
    packed = packs is not None and "_PackedLinear" in type(out.grad_fn).__name__
    assert packed == (packs is not None)
    if packs is not None:
        assert packs.packs[layer]._packed[1] == "vnni"
        with torch.no_grad(), packs.active():  # a reference pass: the same kernel, the same bits
            assert torch.equal(layer(x.detach().to(torch.bfloat16)), out.detach())
    assert not hasattr(layer, "_packed")


def test_frozen_packs_only_for_frozen_bf16_weights():
    ops = kernels.cpu_ops()
    if not ops.vnni_available() or ops.amx_available():
        assert frozen_packs(Linear(32, 16).to(torch.bfloat16).requires_grad_(False)) is None
        return
    assert frozen_packs(Linear(32, 16).to(torch.bfloat16)) is None  # trained: its gradient needs the input
    head = Linear(32, 16, bias=False).to(torch.bfloat16).requires_grad_(False)
    packs = frozen_packs(head)
    assert frozen_pack(head) is None  # none active
    with packs.active():
        packed = frozen_pack(head)
        assert packed is not None and frozen_pack(head) is packed  # made once, then kept
    torch.testing.assert_close(ops.vnni_linear(torch.eye(32, dtype=torch.bfloat16), packed, None), head.weight.T)
    assert frozen_packs(Linear(32, 16).requires_grad_(False)) is None  # float32
    with kernels.disabled():
        assert frozen_packs(Linear(32, 16).to(torch.bfloat16).requires_grad_(False)) is None


@pytest.mark.parametrize("dtype", DTYPES)
@torch.inference_mode()
def test_rms_norm_matches_eager(dtype):
    norm = RMSNorm(72, 1e-6).to(dtype)
    norm.weight.normal_()
    x = torch.randn(5, 72, dtype=dtype) * 3
    fast = norm(x)
    with kernels.disabled():
        close(fast, norm(x), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rot", [16, 8])  # full and partial rotary
@torch.inference_mode()
def test_rope_in_place_matches_eager(dtype, rot):
    x = torch.randn(7, 3, 16, dtype=dtype)
    angles = torch.randn(7, rot // 2)
    cos, sin = torch.cat([angles.cos()] * 2, -1).to(dtype), torch.cat([angles.sin()] * 2, -1).to(dtype)
    with kernels.disabled():
        expected = apply_rope(x.clone(), cos, sin)
    close(apply_rope(x.clone(), cos, sin), expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@torch.inference_mode()
def test_silu_mul_on_fused_halves_matches_eager(dtype):
    gate_up = torch.randn(5, 2 * 40, dtype=dtype) * 4  # 40: a 16-wide vector loop and a scalar tail
    gate, up = gate_up.split(40, dim=-1)
    close(kernels.cpu_ops().silu_mul(gate, up), F.silu(gate) * up, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_argmax_rows_takes_the_first_maximum(dtype):
    x = torch.randn(6, 1000).to(dtype)
    x[1, 7] = x[1, 900] = 50  # a tie: the first one wins, as torch's argmax
    x[2, -1] = 60  # in the scalar tail
    assert torch.equal(kernels.cpu_ops().argmax_rows(x), x.float().argmax(-1))


def reference_attention(q, keys, values, lq, lk, scale, window):
    """q [lq, H, D] as the last lq of lk positions over keys/values [lk, KVH, D]: plain masked softmax in fp32."""
    group = q.shape[1] // keys.shape[1]
    k = keys.float().repeat_interleave(group, 1).transpose(0, 1)
    v = values.float().repeat_interleave(group, 1).transpose(0, 1)
    scores = q.float().transpose(0, 1) @ k.transpose(1, 2) * scale
    qpos, kpos = torch.arange(lk - lq, lk)[:, None], torch.arange(lk)[None]
    allowed = (kpos <= qpos) & ((qpos - kpos < window) if window else True)
    return (scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v).transpose(0, 1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim,window,heads", [(64, None, 6), (64, 5, 6), (24, None, 6), (128, None, 4), (64, None, 8),
                                              (64, None, 10)])  # 24: generic loop; group 5: scores per head
@torch.inference_mode()
def test_paged_attention_kernel_matches_reference(dtype, dim, window, heads):
    """Mixed step: decodes, a 3-token chunk after a cache, a short prompt (kernel), a long one (SDPA); blocks
    shuffled. Two kv heads, groups of 2 to 5 query heads."""
    torch.manual_seed(0)
    kv_heads, bs = 2, 4
    seqlens_q, seqlens_k = [1, 3, 90, 1, 9], [11, 7, 90, 1, 9]
    k_cache = torch.randn(200, bs, kv_heads, dim, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    tables = torch.randperm(200)[:5 * 23].view(5, 23)
    q = torch.randn(sum(seqlens_q), heads, dim, dtype=dtype)
    k_new = torch.randn(sum(seqlens_q), kv_heads, dim, dtype=dtype)
    v_new = torch.randn_like(k_new)
    new_positions = [torch.arange(lk - lq, lk) for lq, lk in zip(seqlens_q, seqlens_k, strict=True)]
    slots = torch.cat([tables[i, p // bs] * bs + p % bs for i, p in enumerate(new_positions)])
    meta = AttnMeta.for_paged(seqlens_q, seqlens_k, slots, tables, block_size=bs)
    assert meta.kernel is not None and meta.kernel.rows == (0, 1, 3, 4)
    out = attention(q, k_new, v_new, meta, (k_cache, v_cache), dim**-0.5, window)
    start = 0
    for i, (lq, lk) in enumerate(zip(seqlens_q, seqlens_k, strict=True)):
        pos = torch.arange(lk)
        keys = k_cache.view(-1, kv_heads, dim)[tables[i, pos // bs] * bs + pos % bs]
        values = v_cache.view(-1, kv_heads, dim)[tables[i, pos // bs] * bs + pos % bs]
        assert torch.equal(keys[lk - lq:], k_new[start:start + lq])  # the new keys were written to their slots
        expected = reference_attention(q[start:start + lq], keys, values, lq, lk, dim**-0.5, window)
        close(out[start:start + lq], expected.to(dtype), dtype, atol=1e-5)
        start += lq


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_projections_keep_names_values_and_outputs(dtype, tmp_path):
    from lmforge.layers.linear import derive_weights
    from lmforge.weights.hf_dir import iter_tensors, save_weights
    from tests.tiny import TINY_LLAMA, tiny_model

    config = {**TINY_LLAMA, "attention_bias": True}  # Qwen2-style q/k/v biases are fused too
    model, fused = tiny_model(config, dtype), tiny_model(config, dtype)
    before = {n: p.clone() for n, p in fused.state_dict().items()}
    derived = derive_weights(fused)
    assert len(derived.joints) == 2 * config["num_hidden_layers"]
    after = fused.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[n], before[n]) for n in before)
    attn = fused.model.layers[0].self_attn
    assert attn.k_proj.weight.data_ptr() == attn.q_proj.weight[-1].data_ptr() + attn.q_proj.weight.stride(0) * \
        attn.q_proj.weight.element_size()  # k's rows follow q's in one tensor
    ids = torch.randint(0, 96, (2, 6))
    with torch.inference_mode(), derived.active():
        for rows in (1, 12):  # the streaming kernel (bf16) and oneDNN / F.linear
            meta = AttnMeta.for_sequences([rows] if rows == 1 else [6, 6])
            x, pos = ids.flatten()[:rows], torch.arange(rows) % 6
            close(fused.logits(fused(x, pos, meta)), model.logits(model(x, pos, meta)), dtype, atol=1e-4)
    save_weights(fused, tmp_path)  # views of one tensor still save as separate, HF-named tensors
    saved = dict(iter_tensors(tmp_path))
    assert all(torch.equal(saved[n], before[n]) for n in before)


def test_fused_layers_fall_back_when_a_weight_is_replaced():
    from lmforge.layers.linear import fuse, linears

    q, k = Linear(32, 32, bias=False).to(torch.bfloat16), Linear(32, 32, bias=False).to(torch.bfloat16)
    derived = DerivedWeights({q: fuse(q, k)})
    q.weight = torch.nn.Parameter(q.weight.detach() * 2)  # e.g. load_state_dict(assign=True)
    x = torch.randn(8, 32, dtype=torch.bfloat16)
    with torch.inference_mode(), derived.active():
        out_q, out_k = linears(x, q, k)
        close(out_q, torch.nn.functional.linear(x, q.weight), torch.bfloat16)
        close(out_k, torch.nn.functional.linear(x, k.weight), torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_kernel_matches_eager(dtype):
    from lmforge.train.loss import _cross_entropy

    torch.manual_seed(0)
    logits = (torch.randn(37, 1000) * 6).to(dtype)  # 1000: a vocabulary that is not a multiple of 16
    labels = torch.randint(0, 1000, (37,))
    loss, grad = _cross_entropy(logits.clone(), labels)
    expected = F.cross_entropy(logits.double(), labels, reduction="none")
    inplace = logits.clone()
    rows = kernels.cpu_ops().cross_entropy_(inplace, labels)
    torch.testing.assert_close(rows.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rows, loss, rtol=1e-5, atol=1e-5)
    close(inplace, grad.to(dtype), dtype)
    with pytest.raises(RuntimeError, match="outside the vocabulary"):
        kernels.cpu_ops().cross_entropy_(logits.clone(), torch.full((37,), 1000))


@pytest.mark.parametrize("shape", [(2, 40, 3, 1, 64), (3, 96, 8, 2, 64), (1, 100, 4, 4, 32), (2, 33, 4, 2, 128)])
def test_attention_backward_kernel_is_as_accurate_as_torch(shape):
    """bf16 gradients of causal attention (GQA, lengths that are not multiples of the kernel's 32-row blocks): the
    AMX kernel's error (torch's float32 backward on builds without AMX) against float64 stays within torch's own
    bf16 backward's, plus a rounding step."""
    from lmforge.layers.train_kernels import causal_attention as trained_causal_attention

    b, length, heads, kv_heads, dim = shape
    torch.manual_seed(0)
    base = [torch.randn(b, length, n, dim) for n in (heads, kv_heads, kv_heads)]
    grad_out = torch.randn(b, length, heads, dim)

    def sdpa(q, k, v, scale):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                              scale=scale, enable_gqa=True).transpose(1, 2)

    results = {}
    for name, fn, dtype in [("ref", sdpa, torch.float64), ("torch", sdpa, torch.bfloat16),
                            ("kernel", trained_causal_attention, torch.bfloat16)]:
        q, k, v = (x.to(dtype).requires_grad_() for x in base)
        out = fn(q, k, v, dim**-0.5)
        assert out is not None
        out.backward(grad_out.to(dtype))
        results[name] = [t.double() for t in (out, q.grad, k.grad, v.grad)]
    assert isinstance(out.grad_fn, torch.autograd.function.BackwardCFunction)  # the kernel's, not SDPA's
    amx = kernels.cpu_ops().amx_available()
    assert type(out.grad_fn).__name__ == ("_CausalAttentionBackward" if amx else "_Float32BackwardBackward")
    for got, own, ref in zip(results["kernel"], results["torch"], results["ref"], strict=True):
        err, own_err = (got - ref).abs().max(), (own - ref).abs().max()
        assert err <= 1.75 * own_err + BF16_ULP * ref.abs().max() * 0.1, (err, own_err)


def test_attention_backward_falls_back_without_autograd_or_bf16():
    from lmforge.layers.train_kernels import causal_attention as trained_causal_attention

    q, k, v = torch.randn(1, 8, 2, 32), torch.randn(1, 8, 2, 32), torch.randn(1, 8, 2, 32)
    assert trained_causal_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), 0.1) is None  # nothing needs grad
    assert trained_causal_attention(q.requires_grad_(), k, v, 0.1) is None  # float32: SDPA's own backward


def _grads(fn, inputs, grad_out):
    leaves = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    out = fn(*leaves)
    out.backward(grad_out.to(out.dtype))
    return [out.detach()] + [x.grad for x in leaves if x.requires_grad]


@pytest.mark.parametrize("x_dtype,out_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                               (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("train_weight", [False, True])
def test_rms_norm_autograd_kernel_matches_eager(x_dtype, out_dtype, train_weight):
    """The RMSNorm Function (forward and backward) against the layer's eager code, with and without autocast."""
    torch.manual_seed(0)
    norm = RMSNorm(72, 1e-6).to(x_dtype)
    norm.weight.data.normal_()
    norm.weight.requires_grad_(train_weight)
    x = torch.randn(5, 7, 72, dtype=x_dtype)
    grad_out = torch.randn(5, 7, 72)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=out_dtype != x_dtype)
    results = []
    for use_kernels in (True, False):
        with autocast, (contextlib.nullcontext() if use_kernels else kernels.disabled()):
            norm.weight.grad = None
            got = _grads(norm, [x], grad_out)
            results.append(got + ([norm.weight.grad] if train_weight else []))
    kernel, eager = results
    assert kernel[0].dtype == eager[0].dtype == out_dtype
    for a, b in zip(kernel, eager, strict=True):
        tol = 1e-5 if out_dtype == torch.float32 else 2 * BF16_ULP
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * max(1.0, b.abs().max().item()))


@pytest.mark.parametrize("x_dtype,cos_dtype,autocast", [(torch.float32, torch.float32, False),
                                                        (torch.bfloat16, torch.bfloat16, False),
                                                        (torch.bfloat16, torch.float32, True)])
@pytest.mark.parametrize("rot", [16, 8])  # 8: partial rotary, the last dims pass through
def test_rope_autograd_kernel_matches_eager(x_dtype, cos_dtype, autocast, rot):
    torch.manual_seed(0)
    x = torch.randn(6, 3, 16, dtype=x_dtype)
    angles = torch.randn(6, rot // 2)
    cos, sin = (torch.cat([f(angles)] * 2, dim=-1).to(cos_dtype) for f in (torch.cos, torch.sin))
    grad_out = torch.randn(6, 3, 16)
    results = []
    for use_kernels in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), \
                (contextlib.nullcontext() if use_kernels else kernels.disabled()):
            results.append(_grads(lambda t: apply_rope(t, cos, sin), [x], grad_out))
    (out_k, dx_k), (out_e, dx_e) = results
    assert dx_k.dtype == dx_e.dtype == x_dtype
    tol = 1e-5 if x_dtype == torch.float32 else 2 * BF16_ULP
    torch.testing.assert_close(out_k.float(), out_e.float(), rtol=tol, atol=tol * 4)
    torch.testing.assert_close(dx_k.float(), dx_e.float(), rtol=tol, atol=tol * 4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_autograd_kernel_matches_eager(dtype):
    torch.manual_seed(0)
    gate_up = torch.randn(9, 2 * 40, dtype=dtype) * 3  # 40: a row that is not a multiple of 16
    grad_out = torch.randn(9, 40)

    def halves(t):
        gate, up = t.split(40, dim=-1)  # the halves of one product: row-strided views
        return swiglu(gate, up)

    with kernels.disabled():
        eager = _grads(halves, [gate_up], grad_out)
    kernel = _grads(halves, [gate_up], grad_out)
    for a, b in zip(kernel, eager, strict=True):
        close(a, b, dtype)


@pytest.mark.parametrize("train_weight", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_float32_linear_autograd_kernel_matches_f_linear(train_weight, bias, monkeypatch):
    """The training Linear (its forward on linear_f32, as on CPUs without AVX512: forced on any host; F.linear where
    the build has no AVX2 kernel) against F.linear, values and gradients."""
    from lmforge.layers import train_kernels

    monkeypatch.setattr(train_kernels, "_avx512", lambda: False)
    torch.manual_seed(0)
    layer = Linear(40, 24, bias=bias)  # 40: inner size not a multiple of 8 (the kernel's masked tail)
    layer.weight.requires_grad_(train_weight)
    x = torch.randn(2, 13, 40, requires_grad=True)
    grad_out = torch.randn(2, 13, 24)
    params = [p for p in layer.parameters() if p.requires_grad]
    used = train_kernels.linear(x, layer.weight, layer.bias) is not None
    assert used == kernels.cpu_ops().linear_f32_available()
    kernel = _grads(layer, [x], grad_out) + [p.grad for p in params]
    for p in params:
        p.grad = None
    eager = _grads(lambda t: F.linear(t, layer.weight, layer.bias), [x], grad_out) + [p.grad for p in params]
    for a, b in zip(kernel, eager, strict=True):
        close(a, b, torch.float32)


@pytest.mark.parametrize("bias", [False, True])
def test_mixed_precision_linear_equals_autocast(bias):
    """A trained float32 weight under bf16 autocast (full fine-tuning in bf16-mixed): the training Linear, which casts
    the weight again in backward instead of keeping autocast's copy, gives autocast's outputs and gradients exactly."""
    from lmforge.layers import train_kernels

    torch.manual_seed(0)
    layer = Linear(40, 24, bias=bias)
    x = torch.randn(13, 40, requires_grad=True)
    grad_out = torch.randn(13, 24, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert train_kernels.mixed_linear(x, layer.weight, layer.bias) is not None
        ours = _grads(layer, [x], grad_out) + [p.grad.clone() for p in layer.parameters()]
        layer.zero_grad()
        eager = _grads(lambda t: F.linear(t, layer.weight, layer.bias), [x], grad_out)
    eager += [p.grad for p in layer.parameters()]
    for a, b in zip(ours, eager, strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # not recording, or not trained: autocast's
        assert train_kernels.mixed_linear(x, layer.weight, layer.bias) is None
    assert train_kernels.mixed_linear(x, layer.weight, layer.bias) is None  # no autocast


def test_mixed_precision_mlp_recomputes_its_product_and_equals_autocast():
    """GatedMLP with trained float32 weights under bf16 autocast runs down(silu(gate) * up) as one Function that keeps
    gate and up only (not their product); its outputs and gradients equal the unfused layers' exactly."""
    from lmforge.layers import train_kernels
    from lmforge.layers.mlp import GatedMLP

    torch.manual_seed(0)
    mlp = GatedMLP(32, 80, "silu")
    x = torch.randn(11, 32, requires_grad=True)
    grad_out = torch.randn(11, 32, dtype=torch.bfloat16)
    fused = []
    real = train_kernels._SiluMulLinear.apply
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(train_kernels._SiluMulLinear, "apply", lambda *a: fused.append(1) or real(*a))
            ours = _grads(mlp, [x], grad_out) + [p.grad.clone() for p in mlp.parameters()]
        mlp.zero_grad()
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(train_kernels, "silu_mul_linear", lambda *a: None)
            unfused = _grads(mlp, [x], grad_out)
    unfused += [p.grad for p in mlp.parameters()]
    assert fused == [1]
    for a, b in zip(ours, unfused, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_each_build_key_covers_every_file_of_its_extension(level, tmp_path, monkeypatch):
    """Editing any source or header of an extension gives its build a new cache directory: no stale module loads.
    Every source here belongs to one extension, and every file a source includes with quotes is hashed."""
    listed = [name for names in kernels.EXTENSIONS.values() for name in names]
    assert sorted(listed) == sorted(p.name for p in kernels._DIR.glob("*.cpp"))
    for extension in kernels.EXTENSIONS:
        hashed = {p.name for p in kernels.sources(extension)}
        for path in kernels.sources(extension):
            included = {line.split('"')[1] for line in path.read_text().splitlines() if line.startswith('#include "')}
            assert included <= hashed, f"{path.name} includes {included - hashed}, not in the build key"
    for path in (*kernels._DIR.glob("*.cpp"), *kernels._DIR.glob("*.h")):
        (tmp_path / path.name).write_bytes(path.read_bytes())
    monkeypatch.setattr(kernels, "_DIR", tmp_path)
    for extension in kernels.EXTENSIONS:
        before = kernels._build_dir(extension, level)[1]
        for path in kernels.sources(extension):
            text = path.read_bytes()
            path.write_bytes(text + b"\n")
            assert kernels._build_dir(extension, level)[1] != before, f"{path.name} is not in the key"
            path.write_bytes(text)
        assert kernels._build_dir(extension, level)[1] == before
