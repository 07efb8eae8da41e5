"""Quantised linear kernels (lmforge/kernels/quant_ops.cpp) against pure-torch references, and GGUF block decoding
against the gguf package's own dequantize."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize as gguf_dequantize

from lmforge import kernels
from lmforge.layers.quant_linear import (
    QuantLinear,
    deinterleave_rows,
    dequantize,
    interleave_rows,
    quantize_activations,
    quantize_int4,
    quantize_int8,
)
from lmforge.weights.gguf_blocks import packed_blocks

needs_kernels = pytest.mark.skipif(kernels.quant_ops() is None, reason="quantised kernels not built here")


@pytest.fixture(autouse=True, params=kernels.levels())
def level(request):
    """Every test runs on each build this CPU executes (native, avx2, portable): an AVX512 host tests the AVX2 path."""
    with kernels.level(request.param):
        yield request.param


LAYOUTS = ["q8_0", "q8_0-f16", "q8_0-f16-grouped", "int8", "int4", "int4-grouped", "int4-f32", "int4-f32-grouped"]


def _weights(layout: str, n: int, k: int, seed: int = 0):
    """(q, scale, min) of a layout; "-grouped": in the kernels' 16-row groups (n rounded up to a multiple)."""
    if layout.endswith("-grouped"):
        q, s, m = _weights(layout.removesuffix("-grouped"), -(-n // 16) * 16, k, seed)
        return interleave_rows(q, s, m) if m.numel() else (*interleave_rows(q, s), m)
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    if layout == "int8":
        q, s = quantize_int8(w)
        return q, s, torch.empty(0)
    if layout.startswith("int4"):
        q, s, m = quantize_int4(w)  # float16 scales and mins; float32 as Q4_K has them
        return (q, s.float(), m.float()) if layout == "int4-f32" else (q, s, m)
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)  # Q8_0: a scale per block
    scale = torch.rand(n, k // 32, generator=g) * 0.01
    return q, scale.half() if layout == "q8_0-f16" else scale, torch.empty(0)


def _exact_reference(x: torch.Tensor, q, s, m, bias) -> torch.Tensor:
    """The kernels' arithmetic in float64: per block, weight scale x activation scale x integer dot product, plus
    min x activation block sum (q4); only the float summation order differs from the kernel's."""
    if s.dim() == 3:
        q, s, m = deinterleave_rows(q, s, m) if m.numel() else (*deinterleave_rows(q, s), m)
    qx, dx, sx = quantize_activations(x)
    n, k = q.shape[0], x.shape[1]
    if q.dtype == torch.uint8:
        from lmforge.layers.quant_linear import unpack_nibbles
        qi = unpack_nibbles(q).double()
    else:
        qi = q.double()
    isum = torch.einsum("mbi,nbi->mnb", qx.double().view(-1, k // 32, 32), qi.view(n, k // 32, 32))
    ws = s.double().unsqueeze(1).expand(n, k // 32) if s.dim() == 1 else s.double()
    y = (isum * ws.unsqueeze(0) * dx.double().unsqueeze(1)).sum(-1)
    if m.numel():
        y += sx.double() @ m.double().T
    if bias is not None:
        y += bias.double()
    return y


@needs_kernels
def test_activation_quantisation_is_the_reference_bit_for_bit():
    x = torch.randn(9, 320) * torch.logspace(-3, 3, 320)
    x[2, :32] = 0  # an all-zero block: scale 0
    x[3, 5] = 0.5 * x[3, :32].abs().max() / 127 * 3  # exact .5 ties somewhere are likely with random data anyway
    q, d, s = kernels.quant_ops().quantize_activations(x)
    rq, rd, rs = quantize_activations(x)
    assert torch.equal(q, rq) and torch.equal(d, rd) and torch.equal(s, rs)


@needs_kernels
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8, 13, 17])
def test_kernel_equals_the_reference_on_the_same_quantised_activations(layout, rows):
    for n, k, biased in ((13, 96, True), (40, 64, False), (1, 32, True), (37, 608, True)):  # 608: 8-block groups + 3
        q, s, m = _weights(layout, n, k, seed=rows)
        n = q.shape[0]
        bias = torch.randn(n) if biased else None
        x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows + n))
        y = kernels.quant_ops().quant_linear(x, q, s, m, bias if bias is not None else torch.empty(0))
        ref = _exact_reference(x, q, s, m, bias)
        scale = ref.abs().max().item() + 1
        assert (y.double() - ref).abs().max().item() <= 2e-6 * scale, (layout, rows, n, k)
        out = torch.full((rows, n), float("nan"))
        kernels.quant_ops().quant_linear_into(x, q, s, m, bias if bias is not None else torch.empty(0), out)
        assert torch.equal(out, y)


@needs_kernels
@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_rows_output_does_not_depend_on_the_batch(layout):
    """The one-row GEMV and the row tiles do the same float operations per output: a sequence decoded alone gets
    bit for bit the logits it gets in a batch."""
    q, s, m = _weights(layout, 45, 608, seed=5)
    bias = torch.randn(q.shape[0])
    x = torch.randn(7, 608)
    batch = kernels.quant_ops().quant_linear(x, q, s, m, bias)
    for row in range(7):
        assert torch.equal(kernels.quant_ops().quant_linear(x[row:row + 1], q, s, m, bias), batch[row:row + 1])


@needs_kernels
@pytest.mark.parametrize("layout", ["q8_0", "q8_0-f16-grouped", "int8", "int4", "int4-grouped"])
def test_kernel_against_float_activations_within_the_stated_bound(layout):
    """int8 activations (per-32 absmax) cost a relative error of about 0.5 %: bound 2 % of the output norm."""
    q, s, m = _weights(layout, 77, 576, seed=3)
    x = torch.randn(6, 576)
    y = kernels.quant_ops().quant_linear(x, q, s, m, torch.empty(0))
    if s.dim() == 3:
        q, s, m = deinterleave_rows(q, s, m) if m.numel() else (*deinterleave_rows(q, s), m)
    ref = F.linear(x, dequantize(q, s, m))
    assert ((y - ref).norm() / ref.norm()).item() < 2e-2


@needs_kernels
def test_bfloat16_activations_and_strided_rows():
    q, s, m = _weights("int4", 24, 64)
    big = torch.randn(5, 128)
    x = big[:, :64]  # rows 128 apart
    y = kernels.quant_ops().quant_linear(x, q, s, m, torch.empty(0))
    assert torch.allclose(y, kernels.quant_ops().quant_linear(x.contiguous(), q, s, m, torch.empty(0)))
    yb = kernels.quant_ops().quant_linear(x.bfloat16(), q, s, m, torch.empty(0))
    assert yb.dtype == torch.bfloat16
    assert ((yb.float() - y).norm() / y.norm()).item() < 2e-2


@needs_kernels
def test_bad_shapes_fail_with_a_message():
    q, s, m = _weights("int8", 8, 64)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        kernels.quant_ops().quant_linear(torch.randn(2, 48), q[:, :48].contiguous(), s, m, torch.empty(0))
    with pytest.raises(RuntimeError, match="does not fit"):
        kernels.quant_ops().quant_linear(torch.randn(2, 96), q, s, m, torch.empty(0))


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quant_linear_layer_kernel_and_reference_paths(method):
    lin = torch.nn.Linear(96, 50)
    layer = QuantLinear.quantize(lin, method)
    x = torch.randn(3, 4, 96)
    with kernels.disabled():
        ref = layer(x)
    w = lin.weight.detach()
    assert torch.allclose(ref, F.linear(x, layer.dequantize(), lin.bias.detach()))
    err = ((layer.dequantize() - w).norm() / w.norm()).item()
    assert err < (0.01 if method == "int8" else 0.1)
    if kernels.quant_ops() is not None:
        y = layer(x)
        assert y.shape == (3, 4, 50)
        assert ((y - ref).norm() / ref.norm()).item() < 2e-2


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_layers_hold_row_groups_and_save_rows(method):
    """A layer of 16k outputs keeps its weight in the kernels' 16-row groups; state_dict (checkpoints) holds the rows
    the quantiser made, a row state_dict loads back into groups, and fused q/k/v-style joints slice groups."""
    from lmforge.layers.quant_linear import QuantJoint, quantize_q8

    lins = [torch.nn.Linear(96, n, bias=False) for n in (48, 16)]
    layers = [QuantLinear.quantize(lin, method) for lin in lins]
    w = lins[0].weight.detach().float()
    made = quantize_q8(w) if method == "int8" else quantize_int4(w)
    assert layers[0].scales.shape == (3, 3, 16) and "16-row groups" in repr(layers[0])
    state = layers[0].state_dict()
    assert all(torch.equal(state[name], t) for name, t in zip(("qweight", "scales", "mins")[:len(made)], made,
                                                              strict=True))
    assert torch.equal(layers[0].dequantize(), dequantize(*made, *(() if len(made) == 3 else (torch.empty(0),))))
    fresh = QuantLinear.quantize(torch.nn.Linear(96, 48, bias=False), method)
    fresh.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(fresh.buffers(), layers[0].buffers(), strict=True))
    x = torch.randn(3, 96)
    alone = [layer(x) for layer in layers]
    joint = QuantJoint(tuple(layers))
    assert all(torch.equal(a, b) for a, b in zip(alone, joint(x), strict=True))
    assert all(torch.equal(a, layer(x)) for a, layer in zip(alone, layers, strict=True))  # views of the joint


def test_quant_embedding_reads_the_heads_rows():
    """A tied model's embedding served from its int8 head: each looked-up row is the head's dequantised row, in
    16-row groups or rows; 4-bit heads are not read this way."""
    from lmforge.layers.quant_linear import QuantEmbedding

    for n in (48, 40):
        head = QuantLinear.quantize(torch.nn.Linear(64, n, bias=False), "int8")
        assert head.scales.dim() == (3 if n % 16 == 0 else 2) and QuantEmbedding.serves(head)
        ids = torch.tensor([[0, 17, n - 1], [5, 16, 3]])
        assert torch.equal(QuantEmbedding(head, torch.bfloat16)(ids), head.dequantize()[ids].bfloat16())
    assert not QuantEmbedding.serves(QuantLinear.quantize(torch.nn.Linear(64, 48), "int4"))


def _random_blocks(qtype: Q, rows: int, blocks: int, seed: int) -> np.ndarray:
    """Random GGUF blocks: every byte random except the fp16 scales, which are random finite halves."""
    size = {Q.Q8_0: 34, Q.Q4_0: 18, Q.Q4_1: 20, Q.Q4_K: 144}[qtype]
    halves = {Q.Q8_0: 1, Q.Q4_0: 1, Q.Q4_1: 2, Q.Q4_K: 2}[qtype]
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (rows, blocks, size), dtype=np.uint8)
    h = (rng.standard_normal((rows, blocks, halves)) * 0.05).astype(np.float16)
    data[..., :2 * halves] = h.view(np.uint8).reshape(rows, blocks, 2 * halves)
    return data.reshape(rows, blocks * size)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K])
def test_gguf_blocks_decode_as_gguf_dequantizes_them_bit_for_bit(qtype):
    blocks = 3 if qtype == Q.Q4_K else 7
    data = _random_blocks(qtype, 11, blocks, seed=int(qtype))
    q, s, m = packed_blocks(data, qtype)
    ours = dequantize(q, s, m if m is not None else torch.empty(0)).numpy()
    theirs = gguf_dequantize(data, qtype).astype(np.float32)
    assert ours.shape == theirs.shape
    # bit for bit, except that Q4_0's d * (q - 8) gives -0.0 for q = 8 and negative d where d * q - 8 d gives +0.0
    nonzero = theirs != 0
    assert np.array_equal(ours[nonzero].view(np.uint32), theirs[nonzero].view(np.uint32))
    assert np.all(ours[~nonzero] == 0)


@needs_kernels
@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K])
def test_kernel_on_gguf_blocks_equals_the_reference(qtype):
    data = _random_blocks(qtype, 19, 2 if qtype == Q.Q4_K else 9, seed=5)
    q, s, m = packed_blocks(data, qtype)
    m = m if m is not None else torch.empty(0)
    x = torch.randn(5, q.shape[1] * (2 if q.dtype == torch.uint8 else 1))
    ref = _exact_reference(x, q, s, m, None)
    y = kernels.quant_ops().quant_linear(x, q, s, m, torch.empty(0))
    assert (y.double() - ref).abs().max().item() <= 2e-6 * (ref.abs().max().item() + 1)



@needs_kernels
@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_native_build_equals_the_avx2_build_bit_for_bit(layout, level):
    """AVX512-VNNI's one-instruction dot products (the native build on such CPUs) and AVX2's three give equal integer
    sums, and the float work around them is the same code: a quantised model decodes the same tokens on both."""
    if level != "native" or "avx2" not in kernels.levels():
        pytest.skip("compares the native build with the avx2 one on a CPU that runs both")
    q, s, m = _weights(layout, 45, 608, seed=3)
    bias = torch.randn(q.shape[0])
    for x in (torch.randn(5, 608), torch.randn(11, 608).bfloat16()):  # bfloat16 outputs: a vector and a scalar rounding
        y = kernels.quant_ops().quant_linear(x, q, s, m, bias)
        with kernels.level("avx2"):
            assert torch.equal(kernels.quant_ops().quant_linear(x, q, s, m, bias), y)


@needs_kernels
@pytest.mark.parametrize("layout", LAYOUTS)
def test_256_bit_vnni_equals_the_avx2_build_bit_for_bit(layout, level):
    """The AVX2 loops with one vpdpbusd per 256-bit integer dot product (int8 weights taken unsigned, as the 512-bit
    loop takes them) — what the native build of an AVX-VNNI CPU without AVX512 runs (Intel's Alder Lake and later
    client parts), tested here in AVX512-VNNI's encoding of the same instruction — equal the avx2 build bit for bit."""
    from lmforge.hardware import cpu_flags

    if level != "avx2" or not {"avx512_vnni", "avx512vl"} <= cpu_flags():
        pytest.skip("needs AVX512-VNNI with VL to run the 256-bit VNNI build")
    vnni = kernels.build("vnni256", "quant_ops")
    assert vnni is not None and vnni.avx2() and vnni.vnni() and not kernels.quant_ops().vnni()
    q, s, m = _weights(layout, 45, 608, seed=3)
    bias = torch.randn(q.shape[0])
    for x in (torch.randn(1, 608), torch.randn(5, 608), torch.randn(11, 608).bfloat16()):
        assert torch.equal(vnni.quant_linear(x, q, s, m, bias), kernels.quant_ops().quant_linear(x, q, s, m, bias))
