"""lmforge's CPU kernels (lmforge/kernels) vs the PyTorch code they replace, on SmolLM2-135M's shapes, one invocation.

Usage: python benchmarks/cpu_kernels.py [--threads 2] [--repeats 5]

Each row times one kernel and its peer on the same inputs in this process (best of --repeats, each a loop of
calls after a warm-up) and prints the ratio peer / kernel (above 1: the kernel is faster). Shapes are those of a
decode step of SmolLM2-135M-Instruct (hidden 576, 9 query / 3 kv heads of 64, MLP 1536, vocab 49152, 30 layers)
in bfloat16:
  linear, 1 row     the 30 layers' fused q/k/v, o, gate/up and down weights (distinct tensors, 226 MB: read from
                    DRAM, as in decode), streaming GEMV kernel (the AVX512-BF16 GEMM where the CPU has no AMX)
                    vs F.linear (oneDNN)
  linear, 64 rows   the same weights, AMX tile kernel (the AVX512-BF16 GEMM where the CPU has no AMX, oneDNN with
                    pre-packed weights where it has neither) vs F.linear, and vs oneDNN with pre-packed weights
  paged attention   64 sequences x 90 cached tokens, 30 KV pools (377 MB, DRAM-resident as in decode): the kernel vs
                    the pure-torch path (gather the blocks, one batched SDPA call with a key mask)
  rms_norm / rope / silu_mul   64 rows, vs the eager ops of lmforge/layers (kernels.disabled())
These are the measurements behind the thresholds in lmforge/layers (SMALL_ROWS, AMX_MAX_ROWS, KERNEL_MAX_*).
Quantised and float32 rows (first; the only ones on CPUs without native bf16): the same 30 layers' linears as
QuantLinear int8 / int4 on 1, 4 and 64 float32 rows vs float32 F.linear, with the GB/s of quantised weight bytes and
the GFLOP/s they reach; paged attention as above with float32 queries over a float32 and an int8 pool.
Training rows (forward + backward under autograd, bf16, one micro-batch of 4 x 512 tokens, the shapes of
benchmarks/train.py): causal attention (torch's flash forward + the AMX backward vs SDPA's own backward), RMSNorm,
rope and SwiGLU (the autograd Functions of lmforge/layers/train_kernels.py vs the layers' eager code), and the
loss's softmax over one 512-row chunk of logits (cross_entropy_ vs its eager reference).
"""

import argparse

import common
import torch
import torch.nn.functional as F

from lmforge import kernels
from lmforge.hardware import bf16_support
from lmforge.layers.attention import AttnMeta, attention
from lmforge.layers.kv_quant import quantize_int8
from lmforge.layers.norm import RMSNorm
from lmforge.layers.rope import apply_rope

LAYERS, HIDDEN, MLP, HEADS, KV_HEADS, DIM = 30, 576, 1536, 9, 3, 64
SHAPES = [(HIDDEN, (HEADS + 2 * KV_HEADS) * DIM), (HEADS * DIM, HIDDEN), (HIDDEN, 2 * MLP), (MLP, HIDDEN)]


def best_ms(fn, repeats: int) -> float:
    return 1e3 * common.best_of(fn, repeats, calls=5)


def forward_all(layers: list, inputs: dict):
    """A call of every layer on the input of its width: what lmforge runs for one step's linears."""
    @torch.inference_mode()
    def run():
        for layer in layers:
            layer(inputs[layer.in_features])
    return run


def linear_rows(rows: int):
    from lmforge.layers.linear import Linear

    layers = []
    for _ in range(LAYERS):
        for fan_in, fan_out in SHAPES:
            layers.append(Linear(fan_in, fan_out, bias=False).to(torch.bfloat16))
    inputs = {fan_in: torch.randn(rows, fan_in, dtype=torch.bfloat16) for fan_in, _ in SHAPES}
    fast = forward_all(layers, inputs)

    @torch.inference_mode()
    def peer():
        for layer in layers:
            F.linear(inputs[layer.in_features], layer.weight)

    packed = [torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach(), None) for layer in layers]

    @torch.inference_mode()
    def onednn_packed():  # what lmforge runs where the CPU has no AMX
        for layer, w in zip(layers, packed, strict=True):
            torch.ops.mkldnn._linear_pointwise(inputs[layer.in_features], w, None, "none", [], "")

    return fast, peer, onednn_packed


def quant_linear_rows(rows: int, method: str):
    """The 30 layers' linears quantised (lmforge/layers/quant_linear.py) vs float32 F.linear on the same shapes;
    returns (fast, peer, weight bytes of the quantised layers, float32 weight bytes)."""
    from lmforge.layers.quant_linear import QuantLinear

    floats, layers = [], []
    for _ in range(LAYERS):
        for fan_in, fan_out in SHAPES:
            w = torch.nn.Linear(fan_in, fan_out, bias=False)
            floats.append(w.weight.detach())
            layers.append(QuantLinear.quantize(w, method))
    inputs = {fan_in: torch.randn(rows, fan_in) for fan_in, _ in SHAPES}
    fast = forward_all(layers, inputs)

    @torch.inference_mode()
    def peer():
        for w in floats:
            F.linear(inputs[w.shape[1]], w)

    return fast, peer, sum(layer.nbytes for layer in layers), sum(w.numel() * 4 for w in floats)


def paged(rows: int = 64, context: int = 90, pools: int = LAYERS, block_size: int = 16,
          dtype: torch.dtype = torch.bfloat16, int8_pool: bool = False):
    blocks = 1024  # 30 layers x 2 x 6 MiB: beyond the caches, and the blocks of a step scattered, as in the engine

    def pool() -> tuple[torch.Tensor, ...]:
        x = torch.randn(blocks, block_size, KV_HEADS, DIM)
        return quantize_int8(x) if int8_pool else (x.to(dtype),)

    caches = []
    for _ in range(pools):
        (k_cache, *k_scale), (v_cache, *v_scale) = pool(), pool()
        caches.append((k_cache, v_cache, *k_scale, *v_scale))
    width = -(-context // block_size)
    tables = torch.randperm(blocks)[:rows * width].view(rows, width)
    lens = [context] * rows
    slots = tables[:, (context - 1) // block_size] * block_size + (context - 1) % block_size
    q = torch.randn(rows, HEADS, DIM, dtype=dtype)
    k = torch.randn(rows, KV_HEADS, DIM, dtype=dtype)

    def run(meta):
        with torch.inference_mode():
            for cache in caches:
                attention(q, k, k, meta, cache, DIM**-0.5)

    kernel_meta = AttnMeta.for_paged([1] * rows, lens, slots, tables, block_size=block_size)
    with kernels.disabled():
        torch_meta = AttnMeta.for_paged([1] * rows, lens, slots, tables, block_size=block_size)

    def peer():
        with kernels.disabled():
            run(torch_meta)

    return (lambda: run(kernel_meta)), peer


def elementwise(rows: int = 64):
    norm = RMSNorm(HIDDEN, 1e-5).to(torch.bfloat16)
    x = torch.randn(rows, HIDDEN, dtype=torch.bfloat16)
    qk = torch.randn(rows, HEADS, DIM, dtype=torch.bfloat16)
    cos, sin = torch.randn(rows, DIM, dtype=torch.bfloat16), torch.randn(rows, DIM, dtype=torch.bfloat16)
    gate, up = torch.randn(rows, 2 * MLP, dtype=torch.bfloat16).split(MLP, dim=-1)
    ops = kernels.cpu_ops()

    def pair(fn):
        def peer():
            with kernels.disabled(), torch.inference_mode():
                fn()

        def fast():
            with torch.inference_mode():
                fn()
        return fast, peer

    return {
        "rms_norm, 64 x 576": pair(lambda: norm(x)),
        "rope, 64 x 9 heads": pair(lambda: apply_rope(qk, cos, sin)),
        "silu_mul, 64 x 1536": (lambda: ops.silu_mul(gate, up), lambda: F.silu(gate) * up),
    }


def training(batch: int = 4, length: int = 512):
    from lmforge.layers.mlp import swiglu
    from lmforge.train.loss import _cross_entropy

    tokens = batch * length
    q = torch.randn(batch, length, HEADS, DIM, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(batch, length, KV_HEADS, DIM, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    lens = AttnMeta.for_sequences([length] * batch)
    norm = RMSNorm(HIDDEN, 1e-5).to(torch.bfloat16)
    x = torch.randn(tokens, HIDDEN, dtype=torch.bfloat16, requires_grad=True)
    qk = torch.randn(tokens, HEADS, DIM, dtype=torch.bfloat16, requires_grad=True)
    angles = torch.randn(tokens, DIM // 2)
    cos, sin = (torch.cat([f(angles)] * 2, dim=-1).to(torch.bfloat16) for f in (torch.cos, torch.sin))
    gate, up = (torch.randn(tokens, MLP, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    logits = torch.randn(512, 49152, dtype=torch.bfloat16) * 4
    labels = torch.randint(0, 49152, (512,))
    ops = kernels.cpu_ops()

    def flat(t):
        return t.view(-1, *t.shape[2:])

    grads = {}

    def step(fn):  # forward, then backward from a fixed gradient of the output's shape and dtype
        out = fn()
        if (out.shape, out.dtype) not in grads:
            grads[out.shape, out.dtype] = torch.randn(out.shape, dtype=out.dtype)
        out.backward(grads[out.shape, out.dtype])

    def pair(fn):
        def peer():
            with kernels.disabled():
                step(fn)
        return (lambda: step(fn)), peer

    return {
        f"train: attention fwd+bwd, {batch} x {length}": pair(
            lambda: attention(flat(q), flat(k), flat(v), lens, None, DIM**-0.5)),
        f"train: rms_norm fwd+bwd, {tokens} x {HIDDEN}": pair(lambda: norm(x)),
        f"train: rope fwd+bwd, {tokens} x {HEADS} heads": pair(lambda: apply_rope(qk, cos, sin)),
        f"train: silu_mul fwd+bwd, {tokens} x {MLP}": pair(lambda: swiglu(gate, up)),
        "train: loss softmax, 512 x 49152": (lambda: ops.cross_entropy_(logits.clone(), labels),
                                             lambda: _cross_entropy(logits.clone(), labels)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ops = kernels.cpu_ops()
    if ops is None:
        raise SystemExit("lmforge's CPU kernels are unavailable here (see the log line above); nothing to compare")
    torch.manual_seed(0)
    if kernels.quant_ops() is not None:
        quant_rows(args)
    float32_attention_rows(args)
    native, why = bf16_support("cpu")
    if not native:  # the bf16 rows would time torch's emulation, and oneDNN's bf16 packing refuses to run
        print(f"bfloat16 rows left out: {why}")
        return
    vnni = not ops.amx_available() and ops.vnni_available()  # lmforge/layers/linear.py's choice of kernel
    big = "AMX tiles" if ops.amx_available() else "AVX512-BF16 GEMM" if vnni else "oneDNN, pre-packed"
    gemv, gemv_peer, _ = linear_rows(1)
    gemm, gemm_peer, gemm_packed = linear_rows(64)
    rows = [("linear, 1 row, 30 layers", "AVX512-BF16 GEMM" if vnni else "streaming GEMV", "F.linear", gemv,
             gemv_peer),
            ("linear, 64 rows, 30 layers", big, "F.linear", gemm, gemm_peer),
            ("linear, 64 rows, 30 layers", big, "oneDNN pre-packed", gemm, gemm_packed),
            ("paged attention, 64 x 90 keys, 30 layers", "kernel", "gather + SDPA", *paged())]
    rows += [(name, "kernel", "eager", fast, peer) for name, (fast, peer) in elementwise().items()]
    if ops.amx_available():
        rows += [(name, "kernel", "eager autograd", fast, peer) for name, (fast, peer) in training().items()]
    print(f"torch {torch.__version__}, {args.threads} threads, bfloat16; best of {args.repeats}; "
          f"ratio = peer / lmforge")
    times = [(best_ms(fast, args.repeats), best_ms(peer, args.repeats)) for _, _, _, fast, peer in rows]
    common.print_table(["what", "lmforge ms", "peer ms", "ratio", "lmforge path / peer"],
                       [[name, f"{t_fast:.3f}", f"{t_peer:.3f}", f"{t_peer / t_fast:.2f}", f"{mine} / {theirs}"]
                        for (name, mine, theirs, _, _), (t_fast, t_peer) in zip(rows, times, strict=True)])


def quant_rows(args) -> None:
    """Quantised linears (int8: 32-block scales, int4: 32-groups with scale and min) vs float32 F.linear: time,
    GB/s of weight bytes streamed and GFLOP/s."""
    flops = 2 * LAYERS * sum(a * b for a, b in SHAPES)
    print(f"quantised linears, 30 layers of SmolLM2-135M's shapes, float32 activations; best of {args.repeats}")
    table = []
    for method in ("int8", "int4"):
        for rows in (1, 4, 64):
            fast, peer, nbytes, _ = quant_linear_rows(rows, method)
            t_fast, t_peer = best_ms(fast, args.repeats), best_ms(peer, args.repeats)
            table.append([f"{method}, {rows} rows", f"{t_fast:.3f}", f"{nbytes / t_fast / 1e6:.1f}",
                          f"{rows * flops / t_fast / 1e6:.1f}", f"{t_peer:.3f}", f"{t_peer / t_fast:.2f}"])
    common.print_table(["what", "lmforge ms", "GB/s", "GFLOP/s", "fp32 F.linear ms", "ratio"], table)
    print()


def float32_attention_rows(args) -> None:
    """Paged attention with float32 queries (the models of CPUs without native bf16) over float32 and int8 pools."""
    print(f"paged attention, 64 sequences x 90 keys, 30 layers, float32 queries; best of {args.repeats}")
    table = []
    for name, int8_pool in (("float32", False), ("int8", True)):
        fast, peer = paged(dtype=torch.float32, int8_pool=int8_pool)
        t_fast, t_peer = best_ms(fast, args.repeats), best_ms(peer, args.repeats)
        table.append([f"{name} pool", f"{t_fast:.3f}", f"{t_peer:.3f}", f"{t_peer / t_fast:.2f}"])
    common.print_table(["what", "lmforge ms", "gather + SDPA ms", "ratio"], table)
    print()


if __name__ == "__main__":
    main()
