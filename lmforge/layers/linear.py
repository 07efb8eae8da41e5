import contextlib
import contextvars
import logging

import torch
import torch.nn.functional as F
from torch import nn

from lmforge import kernels
from lmforge.kernels import usable
from lmforge.layers import quant_linear, train_kernels

log = logging.getLogger("lmforge")
SMALL_ROWS = 3  # up to this many bf16 rows, streaming the weight once beats oneDNN (benchmarks/cpu_kernels.py)
# Up to here lmforge's AMX kernel matches or beats oneDNN with pre-packed weights; beyond, rows go to F.linear, which
# is slower than pre-packed oneDNN for mid-sized batches and level with it for prefill chunks. The AVX512-BF16 kernel
# (CPUs without AMX) takes every row count: faster than pre-packed oneDNN up to 128 rows, level beyond
# (docs/benchmarks.md, "Numbers behind code comments").
AMX_MAX_ROWS = 128
_onednn: dict[str, bool] = {}


class DerivedWeights:
    """What a serving engine derives from a model's weights for its own steps, kept apart from the model: the joint
    weights of fused q/k/v and gate/up products, and packed copies for the CPU kernels. Layers find it only while
    the engine runs its forward (`with derived.active():`, a context variable), so the same model run by a training
    loop, or by another engine, never sees it. A training recipe may keep one too, with packed copies only
    (`frozen_packs`): the frozen base weights of a LoRA run then take the packed kernels under autograd as well."""

    def __init__(self, joints: dict | None = None, adapters: dict | None = None):
        self.joints: dict[nn.Module, object] = joints or {}  # first layer of a fused group -> the group's joint
        self.packs: dict[object, _Pack] = {}  # a module (or joint) -> its packed weight copy
        # a live model's LoRA layer -> (A, scaling * B) in the compute dtype, its update as the kernels take it
        self.adapters: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = adapters or {}

    @contextlib.contextmanager
    def active(self):
        token = _derived.set(self)
        try:
            yield self
        finally:
            _derived.reset(token)

    def pack(self, owner) -> "_Pack":
        cache = self.packs.get(owner)
        if cache is None:
            cache = self.packs[owner] = _Pack()
        return cache

    @torch.no_grad()
    def refresh(self) -> None:
        """After the model's weights changed: joint copies take the new values (in place, so that recorded step
        graphs stay valid), packed copies are rebuilt when next used."""
        for joint in self.joints.values():
            joint.refresh()
        for layer, (a, b) in self.adapters.items():
            a.copy_(layer.lora_A.weight)
            b.copy_(layer.lora_B.weight.float() * layer.scaling)
        self.packs.clear()

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor held here that recorded step graphs may read (oneDNN's opaque packs they never read)."""
        out = [t for joint in self.joints.values() for t in joint.tensors()]
        out += [t for pair in self.adapters.values() for t in pair]
        return out + [p._packed[2] for p in self.packs.values() if p._packed is not None and not p._packed[2].is_mkldnn]


class _Pack:
    __slots__ = ("_packed",)

    def __init__(self):
        self._packed: tuple[tuple[int, int], str, torch.Tensor] | None = None


_derived: contextvars.ContextVar[DerivedWeights | None] = contextvars.ContextVar("lmforge_derived", default=None)


class Linear(nn.Module):
    """nn.Linear's parameters (`weight` [out, in], `bias`) and math. Inference on CPU in bf16 takes a fast path:
    decode-sized inputs lmforge/kernels' GEMV and GEMM kernels, larger ones oneDNN, on a pre-packed copy of the
    weight that a serving engine keeps (DerivedWeights; rebuilt whenever the weight changes; it doubles this
    layer's weight memory). Training: F.linear."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)  # nn.Linear's default, for models built without weights
        if self.bias is not None:
            nn.init.uniform_(self.bias, -(in_features**-0.5), in_features**-0.5)

    def forward(self, x: torch.Tensor, lora=None) -> torch.Tensor:
        """`lora` (the step's LoraBatch, passed by model files to every projection) is for MultiLoRALinear; a plain
        layer has no adapter and ignores it."""
        derived = _derived.get()
        return _linear(x, self.weight, self.bias, derived.pack(self) if derived is not None else None)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class _Joint:
    """Layers whose weights `fuse` laid end to end: the whole weight and bias, and each layer's share."""

    def __init__(self, layers: tuple[Linear, ...], weight: torch.Tensor, bias: torch.Tensor | None, shared: bool):
        self.layers, self.weight, self.bias, self.shared = layers, weight, bias, shared
        self.sizes = [layer.out_features for layer in layers]
        self.addresses = [layer.weight.data_ptr() for layer in layers]

    def intact(self, layers: tuple[Linear, ...]) -> bool:
        """Still the same layers with the same weight tensors (loading with assign=True replaces them).
        Runs twice per decoder layer and step: reads `_parameters` directly (Module.__getattr__ is slow)."""
        for layer, mine, address in zip(layers, self.layers, self.addresses, strict=True):
            if layer is not mine or layer._parameters["weight"].data_ptr() != address:
                return False
        return True

    @torch.no_grad()
    def refresh(self) -> None:
        if not self.shared:  # a copy: take the layers' current values
            torch.cat([layer.weight for layer in self.layers], out=self.weight)
            if self.bias is not None:
                torch.cat([layer.bias for layer in self.layers], out=self.bias)

    def tensors(self) -> list[torch.Tensor]:
        return [self.weight] + ([self.bias] if self.bias is not None else [])


@torch.no_grad()
def fuse(*layers: Linear, share: bool = True) -> _Joint:
    """The weights (and biases) of layers that read the same input (q/k/v, gate/up) end to end in one tensor, so
    that `linears(x, *layers)` runs one matrix product instead of one per layer while the returned joint is in
    effect (DerivedWeights). share=True (a model the engine owns): each layer's parameter becomes a view of its
    rows, names and values unchanged, no memory added. share=False (a live model others train): the joint is a copy,
    the layers untouched; `refresh()` copies new values in."""
    first = layers[0]
    weight = torch.cat([layer.weight for layer in layers])
    biased = first.bias is not None
    bias = torch.cat([layer.bias for layer in layers]) if biased else None
    offset = 0
    for layer in layers if share else ():
        rows = slice(offset, offset + layer.out_features)
        layer.weight = nn.Parameter(weight[rows], requires_grad=layer.weight.requires_grad)
        if biased:
            layer.bias = nn.Parameter(bias[rows], requires_grad=layer.bias.requires_grad)
        offset += layer.out_features
    return _Joint(layers, weight, bias, share)


def derive_weights(model: nn.Module, share: bool = True) -> DerivedWeights:
    """What an engine derives from the model: `fuse` on every q/k/v and gate/up group of plain Linears, or of the
    bases of multi-LoRA layers (serving adapters: they share their bases' product and add their updates to it), and
    each training LoRA layer's factors (not DoRA's) in the compute dtype, the scaling folded into B, so that its
    update runs on the CPU kernels (step graphs record it). Training's LoRALinear groups stay unfused."""
    joints, adapters = {}, {}
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        for module in model.modules():  # in bitwise mode LoRA layers run their own (training) code instead
            if hasattr(module, "lora_A") and not module.dora and not kernels.in_bitwise():  # a training LoRALinear
                adapters[module] = (module.lora_A.weight.to(dtype, copy=True),
                                    (module.lora_B.weight.float() * module.scaling).to(dtype))
    for module in model.modules():
        for names in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
            layers = [_multi_lora_base(getattr(module, name, None)) for name in names]
            if all(type(layer) is Linear for layer in layers) and \
                    len({(layer.bias is None, layer.weight.dtype) for layer in layers}) == 1:
                joints[layers[0]] = fuse(*layers, share=share)
            elif share and None not in layers and quant_linear.fusable(layers):  # QuantJoint lays buffers out
                joints[layers[0]] = quant_linear.QuantJoint(tuple(layers))
    return DerivedWeights(joints, adapters)


def active_derived() -> DerivedWeights | None:
    """The derived weights of the engine whose forward is running here, if any."""
    return _derived.get()


def linears(x: torch.Tensor, *layers: nn.Module, lora=None) -> tuple[torch.Tensor, ...]:
    """(layer(x, lora) for each layer), as one product when `fuse` laid their weights end to end."""
    first = layers[0]
    if type(first) is not Linear and hasattr(first, "add_adapters"):  # MultiLoRALinears: their bases' (joint)
        outs = linears(x, *(layer.base_layer for layer in layers))  # product, then each one's adapters
        return tuple(layer.add_adapters(x, out, lora) for layer, out in zip(layers, outs, strict=True))
    derived = _derived.get()
    joint = derived.joints.get(first) if derived is not None else None
    if joint is None or not joint.intact(layers):
        return tuple(layer(x, lora) for layer in layers)
    if type(joint) is not _Joint:  # QuantLinears' (lmforge/layers/quant_linear.py)
        return joint(x)
    return _linear(x, joint.weight, joint.bias, derived.pack(joint)).split_with_sizes(joint.sizes, dim=-1)


def project(x: torch.Tensor, weight: torch.Tensor, owner) -> torch.Tensor:
    """x @ weight^T, on Linear's fast paths, for a weight that is no Linear's; `owner` (any hashable object) names
    its packed copy among the active engine's derived weights."""
    derived = _derived.get()
    return _linear(x, weight, None, derived.pack(owner) if derived is not None else None)


def product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight^T on Linear's paths, without a packed copy (LoRA's factors in bitwise mode: kernels.bitwise)."""
    return _linear(x, weight, None, None)


def _multi_lora_base(layer: nn.Module | None) -> nn.Module | None:
    return layer.base_layer if hasattr(layer, "add_adapters") else layer


def _linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, cache) -> torch.Tensor:
    if x.dim() == 2 and x.dtype == w.dtype and (ops := usable(x, w)) is not None:
        if x.dtype == torch.bfloat16:
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
        elif w.is_contiguous():  # float32: AVX2 FMAs, the same sums whatever the batch (ATen's product elsewhere)
            return ops.linear_f32(x.contiguous(), w, bias)
        return ops.linear(x, w, bias)  # F.linear's own product, called from C++ so that step graphs record it
    if cache is not None and (out := _frozen_linear(x, w, bias, cache)) is not None:
        return out
    if (out := train_kernels.linear(x, w, bias)) is not None:
        return out
    if (out := train_kernels.mixed_linear(x, w, bias)) is not None:
        return out
    return F.linear(x, w, bias)


def frozen_packs(model: nn.Module) -> DerivedWeights | None:
    """Where a training run keeps packed copies of its frozen bf16 weights (a LoRA base; `with packs.active():`
    around its forwards), or None where they would not be used: no frozen bf16 weight, no AVX512-BF16 kernel (its
    GEMM is the one measured against oneDNN for training's row counts: 432 vs 412 GFLOP/s alone, 368 vs 291 in a
    LoRA DPO step, docs/benchmarks.md), or an AMX CPU (amx_linear serves up to 128 rows only). Each copy costs its
    weight's bytes again: 212 MB for SmolLM2-135M's decoder."""
    ops = kernels.available(next(model.parameters()).device)
    if ops is None or not ops.vnni_available() or ops.amx_available():
        return None
    frozen = any(type(m) is Linear and m.weight.dtype == torch.bfloat16 and not m.weight.requires_grad
                 for m in model.modules())
    return DerivedWeights() if frozen else None


def frozen_pack(layer: Linear) -> torch.Tensor | None:
    """The `vnni_pack` copy of a frozen bf16 layer's weight among the active training packs (`frozen_packs`), made
    when first asked for; None without one (no packs active, a trained or float32 weight, another CPU)."""
    derived, w = _derived.get(), layer.weight
    if derived is None or w.dtype != torch.bfloat16 or w.requires_grad or w.shape[0] % 16 or w.shape[1] % 2:
        return None
    if (ops := kernels.available(w.device)) is None or not ops.vnni_available() or ops.amx_available():
        return None
    kind, packed = _packed(derived.pack(layer), w, ops)
    return packed if kind == "vnni" else None


def _frozen_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, cache: "_Pack"):
    """Under autograd, a frozen bf16 weight (and bias) with a packed copy in `cache`: the forward product on the
    AVX512-BF16 kernel (x cast to bf16 as autocast would), the input's gradient torch's grad @ w
    (train_kernels.packed_linear); None elsewhere."""
    if w.dtype != torch.bfloat16 or w.requires_grad or (bias is not None and bias.requires_grad):
        return None
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
    n, k = w.shape
    if dtype != torch.bfloat16 or x.dim() != 2 or n % 16 or k % 2 or (ops := kernels.available(x.device)) is None:
        return None
    if not ops.vnni_available() or ops.amx_available():
        return None
    kind, packed = _packed(cache, w, ops)
    return train_kernels.packed_linear(x.to(dtype), w, bias, packed) if kind == "vnni" else None


def _packed(cache: _Pack | None, w: torch.Tensor, ops) -> tuple[str | None, torch.Tensor | None]:
    """(layout, packed copy of w), kept in cache._packed (the active engine's) and rebuilt when w changes: "amx"
    (lmforge's tile layout)
    where the CPU has AMX and the shape allows, else "vnni" (the AVX512-BF16 kernel's panels), else "onednn" (its
    blocked layout: its GEMM then skips a reorder per call); (None, None) when w cannot be packed."""
    if cache is None or w.is_inference():  # no engine to keep it, or no version counter to notice updates by
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
