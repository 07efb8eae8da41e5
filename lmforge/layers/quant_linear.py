"""Weight-only quantised linear layers for serving: weights in 8 or 4 bits, activations float.

A `QuantLinear` holds its weight packed in one of two layouts (the kernels' layouts, lmforge/kernels/quant_ops.cpp):
  "q8": int8 `qweight` [out, in] and `scales`, one per 32-element block [out, in/32] (GGUF Q8_0 and
        `quantization="int8"`: float16) or one per output channel [out] (float32); value = scale * q.
  "q4": uint8 `qweight` [out, in/2], each 32-block's 16 bytes holding element i in the low nibble of byte i and
        element i + 16 in the high one; `scales` and `mins` [out, in/32] (float16, or float32 for Q4_K whose
        sub-block scales are products); value = scale * q + min. GGUF Q4_0
        (min = -8 scale), Q4_1, Q4_K (its 32-element sub-blocks' scale and min, multiplied out exactly in float32)
        and `quantization="int4"` (per-32 asymmetric groups, the Q4_1 idea) all take this layout.
With block scales (float16 for q8) and `out` a multiple of 16, both are held in memory in groups of 16 output rows
(`interleave_rows`: the kernels' fastest layout, scales and mins [out/16, in/32, 16]; q8 bytes stored + 128);
state_dict and checkpoints keep the rows.
On CPU the kernels quantise activations per 32-block to int8 and compute integer dot products; elsewhere (or with
kernels off) `forward` dequantises the weight and calls F.linear: the pure-torch reference the kernels are tested
against. Buffers, not parameters: nothing here trains.
"""

import torch
import torch.nn.functional as F
from torch import nn

from lmforge import kernels
from lmforge.errors import LmforgeError

BLOCK = 32
GROUP = 16  # output rows per group of the kernels' layout (a 512-bit vector of int32 sums)
_EMPTY = torch.empty(0)


class QuantLinear(nn.Module):
    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        q4 = qweight.dtype == torch.uint8
        self.layout = "q4" if q4 else "q8"
        self.out_features = qweight.shape[0]
        self.in_features = qweight.shape[1] * (2 if q4 else 1)
        self.dtype = dtype  # the float dtype of the layer it replaced: outputs (and LoRA slots over it) use it
        self.register_buffer("qweight", qweight.contiguous())
        scale_dtype = torch.float16 if scales.dtype == torch.float16 and scales.dim() == 2 else torch.float32
        self.register_buffer("scales", scales.to(scale_dtype).contiguous())
        # Absent ones are the shared empty tensor (the kernels' "none"), not buffers: checkpoints hold no empty tensors.
        if q4:
            self.register_buffer("mins", mins.to(scale_dtype).contiguous())
        else:
            self.mins = _EMPTY
        if bias is not None:
            self.register_buffer("bias", bias.float().contiguous())
        else:
            self.bias = _EMPTY
        if not self.qweight.is_meta:  # built on meta to be loaded: build_quantized_model groups after the load
            self.group_rows()

    @property
    def _grouped_names(self) -> tuple[str, ...]:
        return ("qweight", "scales", "mins") if self.layout == "q4" else ("qweight", "scales")

    def group_rows(self) -> None:
        """Holds the weight in the kernels' row groups (`interleave_rows`) where it can: block scales (float16 for
        int8), a multiple of GROUP outputs."""
        if self.scales.dim() == 2 and self.out_features % GROUP == 0 and \
                (self.layout == "q4" or self.scales.dtype == torch.float16):
            grouped = interleave_rows(*(getattr(self, name) for name in self._grouped_names))
            for name, t in zip(self._grouped_names, grouped, strict=True):
                setattr(self, name, t)

    def _rows(self) -> tuple[torch.Tensor, ...]:
        """The grouped tensors (`_grouped_names`) in the row layout."""
        grouped = tuple(getattr(self, name) for name in self._grouped_names)
        return deinterleave_rows(*grouped) if self.scales.dim() == 3 else grouped

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.scales.dim() == 3:  # checkpoints hold rows: the format of weights/quantized.py
            destination.update({prefix + name: t for name, t in zip(self._grouped_names, self._rows(), strict=True)})

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self.scales.dim() == 3 and state_dict.get(prefix + "scales", self.scales).dim() == 2:
            names = [prefix + name for name in self._grouped_names]
            if all(name in state_dict for name in names):  # else: the load reports what is missing
                state_dict.update(zip(names, interleave_rows(*(state_dict[name] for name in names)), strict=True))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @classmethod
    def quantize(cls, linear: nn.Module, method: str) -> "QuantLinear":
        """From a float layer with `weight` [out, in] (and `bias`): "int8" symmetric per 32-block (absmax), "int4"
        asymmetric per 32-group (scale and min). Per-channel int8 (`quantize_int8`, which the kernels also take) is
        not offered: on SmolLM2-135M it tripled the KL divergence from the float model (docs/status.md)."""
        w = linear.weight.detach().float()
        bias = linear.bias.detach() if linear.bias is not None else None
        if method == "int8":
            return cls(*quantize_q8(w), bias=bias, dtype=linear.weight.dtype)
        if method == "int4":
            return cls(*quantize_int4(w), bias=bias, dtype=linear.weight.dtype)
        raise LmforgeError(f"unknown weight quantization {method!r}; choose int8 or int4")

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [out, in] the packed one stands for (exactly: every scale * q + min is one rounding)."""
        q, scales, *mins = self._rows()
        return dequantize(q, scales, mins[0] if mins else self.mins)

    def forward(self, x: torch.Tensor, lora=None) -> torch.Tensor:
        """`lora` is for the MultiLoRALinear that may wrap this layer; a plain one ignores it (as Linear does)."""
        ops = _kernels(x, self.in_features)
        if ops is None:
            bias = self.bias.to(x.dtype) if self.bias.numel() else None
            return F.linear(x, self.dequantize().to(x.dtype), bias)
        flat = x.reshape(-1, self.in_features)
        out = ops.quant_linear(flat if flat.stride(-1) == 1 else flat.contiguous(), self.qweight, self.scales,
                               self.mins, self.bias)
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        per = "channel" if self.scales.dim() == 1 else "32-block"
        groups = f", {GROUP}-row groups" if self.scales.dim() == 3 else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, layout={self.layout} " \
               f"(per-{per} scales{groups}), bias={bool(self.bias.numel())}"


def _kernels(x: torch.Tensor, in_features: int):
    """The quantised kernels when they apply to x (CPU, float32/bfloat16, no autograd on x), else None."""
    if not x.is_cpu or x.dtype not in (torch.float32, torch.bfloat16) or kernels.switched_off() \
            or in_features % BLOCK or (x.requires_grad and torch.is_grad_enabled()):
        return None
    return kernels.quant_ops()


class QuantEmbedding(nn.Module):
    """The token embedding of a tied model read from its int8 lm_head (llama.cpp serves token_embd quantised too):
    each token's row dequantised on lookup, so no float copy of the [vocab, hidden] table stays in memory. The head's
    values are the table's up to int8 rounding, and exactly the table where it came from a GGUF Q8_0 tensor."""

    def __init__(self, head: QuantLinear, dtype: torch.dtype):
        super().__init__()
        self._head = (head,)  # a tuple: not a submodule, so state_dict and modules() hold the head once
        self.dtype = dtype
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features

    @staticmethod
    def serves(head: nn.Module) -> bool:
        return type(head) is QuantLinear and head.layout == "q8" and head.scales.dim() >= 2

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        head = self._head[0]
        q, scales, nb = head.qweight, head.scales, self.embedding_dim // BLOCK
        if scales.dim() == 3:  # 16-row groups: row t is lane t % 16 of group t // 16, its bytes + 128
            group, lane = ids // GROUP, ids % GROUP
            rows = q.view(-1, nb, BLOCK // 4, GROUP, 4)[group, :, :, lane] ^ -128
            scale = scales[group, :, lane]
        else:
            rows, scale = q[ids], scales[ids]
        values = rows.float().view(*ids.shape, nb, BLOCK) * scale.float().unsqueeze(-1)  # exact in float32
        return values.flatten(-2).to(self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, read from the int8 lm_head"


class QuantJoint:
    """QuantLinears that read the same input (q/k/v, gate/up) laid end to end: one kernel call (one activation
    quantisation) for all, each layer's buffers then views of the joint rows."""

    def __init__(self, layers: tuple[QuantLinear, ...]):
        self.layers = layers
        self.sizes = [layer.out_features for layer in layers]
        first = layers[0]
        self.qweight = torch.cat([layer.qweight for layer in layers])
        self.scales = torch.cat([layer.scales for layer in layers])
        self.mins = torch.cat([layer.mins for layer in layers]) if first.layout == "q4" else first.mins
        biased = bool(first.bias.numel())
        self.bias = torch.cat([layer.bias for layer in layers]) if biased else first.bias
        offset, group = 0, GROUP if first.scales.dim() == 3 else 1  # a grouped layer's scales: its groups'
        for layer in layers:
            rows = slice(offset, offset + layer.out_features)
            blocks = slice(offset // group, (offset + layer.out_features) // group)
            layer.qweight, layer.scales = self.qweight[rows], self.scales[blocks]
            if first.layout == "q4":
                layer.mins = self.mins[blocks]
            if biased:
                layer.bias = self.bias[rows]
            offset += layer.out_features
        self.addresses = [layer.qweight.data_ptr() for layer in layers]
        self.in_features = first.in_features

    def refresh(self) -> None:
        """Nothing to copy: the layers' buffers are views of the joint ones (quantised models are the engine's own)."""

    def tensors(self) -> list[torch.Tensor]:
        return [self.qweight, self.scales, self.mins, self.bias]

    def intact(self, layers: tuple[nn.Module, ...]) -> bool:
        for layer, mine, address in zip(layers, self.layers, self.addresses, strict=True):
            if layer is not mine or layer._buffers["qweight"].data_ptr() != address:
                return False
        return True

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ops = _kernels(x, self.in_features)
        if ops is None:
            return tuple(layer(x) for layer in self.layers)
        flat = x.reshape(-1, self.in_features)
        out = ops.quant_linear(flat if flat.stride(-1) == 1 else flat.contiguous(), self.qweight, self.scales,
                               self.mins, self.bias)
        return out.view(*x.shape[:-1], -1).split_with_sizes(self.sizes, dim=-1)


def fusable(layers: list[nn.Module]) -> bool:
    """Whether QuantLinears can share one joint product: the same layout, scale kind and bias presence."""
    return all(type(layer) is QuantLinear for layer in layers) and len(
        {(layer.layout, layer.scales.dim(), layer.scales.dtype, bool(layer.bias.numel()), layer.in_features)
         for layer in layers}) == 1


# ---- packing and quantisation (pure torch: the reference the kernels are tested against) -----------------------------
def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """q [N, K] with values 0..15 -> uint8 [N, K/2] in the q4 layout (per 32-block: byte i = q[i] | q[i+16] << 4)."""
    n, k = q.shape
    blocks = q.to(torch.uint8).view(n, k // BLOCK, BLOCK)
    return (blocks[..., :BLOCK // 2] | (blocks[..., BLOCK // 2:] << 4)).reshape(n, k // 2)


def interleave_rows(q: torch.Tensor, *blocks: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """q [N, bytes per row] (int8 [N, K] or 4-bit [N, K/2]) and per-block tensors [N, K/32] (scales, mins) -> the
    kernels' 16-row groups: per group and 32-block, runs of 64 bytes, run j holding bytes 4j..4j+3 of each of the 16
    rows' block; per-block tensors [N/16, K/32, 16]. int8 bytes are stored + 128 (w ^ 0x80: AVX512-VNNI's unsigned
    operand, quant_ops.cpp)."""
    n, width = q.shape
    nb = blocks[0].shape[1]
    grouped = q.reshape(n // GROUP, GROUP, nb, width // nb // 4, 4).permute(0, 2, 3, 1, 4).reshape(n, width)
    if q.dtype == torch.int8:
        grouped = grouped ^ -128
    return grouped, *(t.reshape(n // GROUP, GROUP, nb).transpose(1, 2).contiguous() for t in blocks)


def deinterleave_rows(q: torch.Tensor, *blocks: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The inverse of interleave_rows: q [N, bytes per row] and per-block tensors [N, K/32]."""
    n, width = q.shape
    nb = blocks[0].shape[1]
    if q.dtype == torch.int8:
        q = q ^ -128
    q = q.reshape(n // GROUP, nb, width // nb // 4, GROUP, 4).permute(0, 3, 1, 2, 4).reshape(n, width)
    return q, *(t.transpose(1, 2).reshape(n, nb) for t in blocks)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] (q4 layout) -> uint8 values 0..15 [N, K]."""
    n, half = packed.shape
    blocks = packed.view(n, half * 2 // BLOCK, BLOCK // 2)
    return torch.cat([blocks & 0x0F, blocks >> 4], dim=-1).reshape(n, half * 2)


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    scales, mins = scales.float(), mins.float()
    if qweight.dtype == torch.uint8:
        q = unpack_nibbles(qweight).float().view(qweight.shape[0], -1, BLOCK)
        return (q * scales.unsqueeze(-1) + mins.unsqueeze(-1)).flatten(1)
    if scales.dim() == 1:
        return qweight.float() * scales.unsqueeze(-1)
    return (qweight.float().view(qweight.shape[0], -1, BLOCK) * scales.unsqueeze(-1)).flatten(1)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: scale = absmax / 127."""
    scale = w.abs().amax(dim=1) / 127
    inv = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    return (w * inv.unsqueeze(1)).round().clamp(-127, 127).to(torch.int8), scale


def quantize_int4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit groups of 32 along in_features: scale = (max - min) / 15, min = the group's minimum, both
    stored in float16 (as GGUF's Q4_1; a group narrower than float16's smallest normal scale, ~6e-5 x 15, loses
    precision) and q computed from the stored values."""
    n, k = w.shape
    if k % BLOCK:
        raise LmforgeError(f"int4 quantization needs in_features divisible by {BLOCK}, got a [{n}, {k}] weight")
    groups = w.view(n, k // BLOCK, BLOCK)
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
    lo = lo.half().float()
    scale = ((hi - lo) / 15).half().float()
    inv = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    q = ((groups - lo.unsqueeze(-1)) * inv.unsqueeze(-1)).round().clamp(0, 15)
    return pack_nibbles(q.view(n, k)), scale.half(), lo.half()


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the kernels do to x [M, K] (float32) first: int8 per 32-block, scale = absmax / 127, round to nearest
    even; returns (q int8 [M, K], scale [M, K/32], scale * sum(q) [M, K/32])."""
    m, k = x.shape
    blocks = x.float().view(m, k // BLOCK, BLOCK)
    scale = blocks.abs().amax(dim=-1) / 127
    inv = torch.where(scale != 0, 1 / scale, torch.zeros_like(scale))
    q = (blocks * inv.unsqueeze(-1)).round()
    return q.to(torch.int8).view(m, k), scale, scale * q.sum(dim=-1)


def quantize_q8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per 32-element block along in_features (GGUF Q8_0's scheme: float16 scales, q computed from
    the stored scale)."""
    n, k = w.shape
    if k % BLOCK:
        raise LmforgeError(f"int8 quantization needs in_features divisible by {BLOCK}, got a [{n}, {k}] weight")
    blocks = w.view(n, k // BLOCK, BLOCK)
    scale = (blocks.abs().amax(dim=-1) / 127).half()
    inv = torch.where(scale > 0, 1 / scale.float(), torch.zeros_like(scale.float()))
    return (blocks * inv.unsqueeze(-1)).round().clamp(-127, 127).to(torch.int8).view(n, k), scale
