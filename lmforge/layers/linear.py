import logging

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.kernels import usable

log = logging.getLogger("lmforge")
SMALL_ROWS = 3  # up to this many bf16 rows, streaming the weight once beats oneDNN (benchmarks/cpu_kernels.py)
# Up to here lmforge's AMX kernel matches or beats oneDNN with pre-packed weights (1.1x at 64 rows); beyond, rows go
# to F.linear, 1.3-1.6x slower than pre-packed oneDNN for 129-1024 rows and equal from 2048 (prefill chunks). The
# AVX512-BF16 kernel (CPUs without AMX) takes every row count: 1.2-1.5x oneDNN pre-packed at 1-128 rows, level with
# it and with F.linear beyond.
AMX_MAX_ROWS = 128
# float32: MKL's GEMV (1 row) streams the weight at memory speed, but its GEMM for 2-8 rows (a speculative step's
# 1 + k tokens, small decode batches) costs 2-4x that; the AVX2 kernel reads the weight once for all of them.
F32_SMALL_ROWS = 8
_onednn: dict[str, bool] = {}


class Linear(nn.Module):
    """nn.Linear's parameters (`weight` [out, in], `bias`) and math. Inference on CPU in bf16 takes a fast path:
    decode-sized inputs lmforge/kernels' GEMV and GEMM kernels, larger ones oneDNN, on a pre-packed copy of the
    weight (rebuilt whenever the weight changes; it doubles this layer's weight memory). Training: F.linear."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)  # nn.Linear's default, for models built without weights
        if self.bias is not None:
            nn.init.uniform_(self.bias, -(in_features**-0.5), in_features**-0.5)
        self._packed: tuple[tuple[int, int], str, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor, lora=None) -> torch.Tensor:
        """`lora` (the step's LoraBatch, passed by model files to every projection) is for MultiLoRALinear; a plain
        layer has no adapter and ignores it."""
        return _linear(x, self.weight, self.bias, self)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class _Joint:
    """Layers whose weights `fuse` laid end to end: the whole weight and bias, and each layer's share."""

    def __init__(self, layers: tuple[Linear, ...], weight: torch.Tensor, bias: torch.Tensor | None):
        self.layers, self.weight, self.bias = layers, weight, bias
        self.sizes = [layer.out_features for layer in layers]
        self.addresses = [layer.weight.data_ptr() for layer in layers]
        self._packed: tuple[tuple[int, int], str, torch.Tensor] | None = None

    def intact(self, layers: tuple[Linear, ...]) -> bool:
        """Still the same layers, each weight still a view of the joint one (loading with assign=True replaces).
        Runs twice per decoder layer and step: reads `_parameters` directly (Module.__getattr__ costs 0.6 us)."""
        for layer, mine, address in zip(layers, self.layers, self.addresses, strict=True):
            if layer is not mine or layer._parameters["weight"].data_ptr() != address:
                return False
        return True


@torch.no_grad()
def fuse(*layers: Linear) -> None:
    """Lays the weights (and biases) of layers that read the same input (q/k/v, gate/up) end to end in one tensor,
    each layer's parameter becoming a view of its rows: names, values and modules stay the same, and
    `linears(x, *layers)` then runs one matrix product instead of one per layer."""
    first = layers[0]
    weight = torch.cat([layer.weight for layer in layers])
    biased = first.bias is not None
    bias = torch.cat([layer.bias for layer in layers]) if biased else None
    offset = 0
    for layer in layers:
        rows = slice(offset, offset + layer.out_features)
        layer.weight = nn.Parameter(weight[rows], requires_grad=layer.weight.requires_grad)
        if biased:
            layer.bias = nn.Parameter(bias[rows], requires_grad=layer.bias.requires_grad)
        layer._packed = None
        offset += layer.out_features
    first._joint = _Joint(layers, weight, bias)


def fuse_projections(model: nn.Module) -> int:
    """`fuse` on every q/k/v and gate/up group of plain Linears in the model, or of the bases of multi-LoRA layers
    (serving adapters: they share their bases' product and add their updates to it); returns how many groups.
    Training's LoRALinear groups stay unfused."""
    groups = 0
    for module in model.modules():
        for names in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
            layers = [_multi_lora_base(getattr(module, name, None)) for name in names]
            if all(type(layer) is Linear for layer in layers) and \
                    len({(layer.bias is None, layer.weight.dtype) for layer in layers}) == 1:
                fuse(*layers)
                groups += 1
    return groups


def linears(x: torch.Tensor, *layers: nn.Module, lora=None) -> tuple[torch.Tensor, ...]:
    """(layer(x, lora) for each layer), as one product when `fuse` laid their weights end to end."""
    first = layers[0]
    if type(first) is not Linear and hasattr(first, "add_adapters"):  # MultiLoRALinears: their bases' (joint)
        outs = linears(x, *(layer.base_layer for layer in layers))  # product, then each one's adapters
        return tuple(layer.add_adapters(x, out, lora) for layer, out in zip(layers, outs, strict=True))
    joint = first.__dict__.get("_joint")  # not getattr: a miss would go through Module.__getattr__ (1 us)
    if joint is None or not joint.intact(layers):
        return tuple(layer(x, lora) for layer in layers)
    return _linear(x, joint.weight, joint.bias, joint).split_with_sizes(joint.sizes, dim=-1)


def project(x: torch.Tensor, weight: torch.Tensor, cache) -> torch.Tensor:
    """x @ weight^T, on Linear's fast paths, for a weight that is no Linear's: `cache` (any object with a `_packed`
    attribute) keeps its packed copy, rebuilt when the weight changes."""
    return _linear(x, weight, None, cache)


def _multi_lora_base(layer: nn.Module | None) -> nn.Module | None:
    return layer.base_layer if hasattr(layer, "add_adapters") else layer


def _linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, cache) -> torch.Tensor:
    if x.dim() == 2 and x.dtype == torch.bfloat16 == w.dtype and (ops := usable(x, w)) is not None:
        kind, packed = _packed(cache, w, ops)
        rows = x.shape[0]
        if kind == "vnni":
            return ops.vnni_linear(x.contiguous(), packed, bias)
        if rows <= SMALL_ROWS:
            return ops.linear_small(x.contiguous(), w, bias)
        if kind == "amx" and rows <= AMX_MAX_ROWS:
            return ops.amx_linear(x.contiguous(), packed, bias)
        if kind == "onednn":
            return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    elif x.dtype == torch.float32 == w.dtype and x.dim() == 2 and 1 < x.shape[0] <= F32_SMALL_ROWS \
            and w.is_contiguous() and (ops := usable(x, w)) is not None:
        return ops.linear_small(x.contiguous(), w, bias)
    return F.linear(x, w, bias)


def _packed(cache, w: torch.Tensor, ops) -> tuple[str | None, torch.Tensor | None]:
    """(layout, packed copy of w), kept in cache._packed and rebuilt when w changes: "amx" (lmforge's tile layout)
    where the CPU has AMX and the shape allows, else "vnni" (the AVX512-BF16 kernel's panels), else "onednn" (its
    blocked layout: its GEMM then skips a reorder per call); (None, None) when w cannot be packed."""
    if w.is_inference():  # made under inference_mode: no version counter to notice updates by
        return None, None
    key = (w.data_ptr(), w._version)  # any in-place update (optimizer step, weight sync, load) bumps it
    if cache._packed is None or cache._packed[0] != key:
        n, k = w.shape
        if ops.amx_available() and n % 32 == 0 and k % 32 == 0:
            cache._packed = (key, "amx", ops.amx_pack(w.detach()))
        elif not ops.amx_available() and ops.vnni_available() and n % 16 == 0 and k % 2 == 0:  # measured only there
            cache._packed = (key, "vnni", ops.vnni_pack(w.detach()))
        elif _onednn_packing():
            cache._packed = (key, "onednn", torch.ops.mkldnn._reorder_linear_weight(w.detach(), None))
        else:
            return None, None
    return cache._packed[1], cache._packed[2]


def _onednn_packing() -> bool:
    """Whether this torch build packs bf16 weights for oneDNN; checked once (a failed probe is logged)."""
    if "ok" not in _onednn:
        try:
            w = torch.ones(8, 8, dtype=torch.bfloat16)
            out = torch.ops.mkldnn._linear_pointwise(w, torch.ops.mkldnn._reorder_linear_weight(w, None), None,
                                                     "none", [], "")
            _onednn["ok"] = bool(torch.equal(out, torch.full((8, 8), 8.0, dtype=torch.bfloat16)))
        except (RuntimeError, AttributeError) as e:
            log.info("oneDNN weight packing unavailable (%s); bf16 linears use F.linear", e)
            _onednn["ok"] = False
    return _onednn["ok"]
