"""NF4 (4-bit NormalFloat, QLoRA): frozen linear weights kept as two 4-bit codes per byte plus block scales.

Each block of 64 weights is divided by its absmax and every value replaced by the nearest of 16 levels (the
quantiles of a normal distribution, so the levels are dense where weights are). The absmax scales are themselves
quantised ("double quantisation"): their mean is subtracted and each run of 256 is stored as int8 against an fp32
factor. Memory: 0.5 byte per weight + 1 byte per 64 + 4 bytes per 16,384, about 0.516 byte per weight.
"""

import torch
import torch.nn.functional as F
from torch import nn

# The 16 NF4 levels of the QLoRA paper (appendix E): normal quantiles scaled to [-1, 1], with an exact zero.
NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)
BLOCK = 64  # weights per absmax scale
SCALE_BLOCK = 256  # scales per second-level factor
_CHUNK_BLOCKS = 2**16  # blocks quantised at a time: bounds the temporaries for multi-GB layers


def _padded(t: torch.Tensor, multiple: int) -> torch.Tensor:
    return F.pad(t, (0, -t.numel() % multiple))


def quantize_codes(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (any shape) -> (packed codes uint8 [ceil(n / 2)], absmax per 64-weight block fp32 [blocks]).

    Zero padding completes the last block; the first code of each pair sits in the high nibble."""
    blocks = _padded(weight.detach().flatten(), BLOCK).view(-1, BLOCK)
    levels = torch.tensor(NF4_LEVELS, device=weight.device)
    midpoints = (levels[1:] + levels[:-1]) / 2  # nearest level = how many midpoints lie below the value
    absmax = torch.empty(blocks.shape[0], device=weight.device)
    packed = torch.empty(blocks.shape[0], BLOCK // 2, dtype=torch.uint8, device=weight.device)
    for start in range(0, blocks.shape[0], _CHUNK_BLOCKS):
        chunk = blocks[start:start + _CHUNK_BLOCKS].float()
        scale = chunk.abs().amax(dim=1)
        normalised = chunk / scale.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
        codes = torch.bucketize(normalised, midpoints).to(torch.uint8)
        packed[start:start + _CHUNK_BLOCKS] = codes[:, 0::2] << 4 | codes[:, 1::2]
        absmax[start:start + _CHUNK_BLOCKS] = scale
    return packed.flatten()[:(weight.numel() + 1) // 2], absmax


def quantize_scales(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """absmax fp32 [blocks] -> (int8 codes [blocks], fp32 factor per 256 codes, fp32 offset): the second level.

    code = round((absmax - offset) * factor), factor = 128 / max |absmax - offset| of the run (127 at most)."""
    offset = absmax.mean()
    centred = _padded(absmax - offset, SCALE_BLOCK).view(-1, SCALE_BLOCK)
    factor = 128 / centred.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
    codes = (centred * factor[:, None]).round().clamp(-128, 127).to(torch.int8)
    return codes.flatten()[:absmax.numel()], factor, offset


def dequantize_scales(codes: torch.Tensor, factor: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    runs = _padded(codes.float(), SCALE_BLOCK).view(-1, SCALE_BLOCK)
    return (runs / factor[:, None] + offset).flatten()[:codes.numel()]


def dequantize(packed: torch.Tensor, absmax: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """The weight of `shape` in dtype, from packed codes and (dequantised) block scales."""
    levels = torch.tensor(NF4_LEVELS, dtype=dtype, device=packed.device)
    byte = torch.arange(256, device=packed.device)
    pairs = torch.stack([levels[byte >> 4], levels[byte & 15]], dim=1)  # one lookup per byte yields both codes
    values = _padded(pairs[packed.int()].flatten(), BLOCK).view(-1, BLOCK)
    n = shape.numel()
    return (values * absmax.to(dtype)[:, None]).flatten()[:n].view(shape)


class _FrozenNF4Matmul(torch.autograd.Function):
    """x @ W^T where W is dequantised again in backward instead of being kept: autograd would otherwise hold a
    full-precision copy of every frozen weight until backward, which is what QLoRA exists to avoid."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "NF4Linear") -> torch.Tensor:
        ctx.layer = layer
        return F.linear(x, layer.dequantized(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ ctx.layer.dequantized(grad.dtype), None


class NF4Linear(nn.Module):
    """A frozen linear layer over an NF4 weight; forward dequantises to the compute dtype and runs the product.

    The input gradient flows (LoRA layers and earlier blocks train through it); the weight gets none."""

    def __init__(self, packed: torch.Tensor, absmax: torch.Tensor, out_features: int, in_features: int,
                 bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        codes, factor, offset = quantize_scales(absmax)
        self.register_buffer("weight_packed", packed)
        self.register_buffer("scale_codes", codes)
        self.register_buffer("scale_factor", factor)
        self.register_buffer("scale_offset", offset)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Module) -> "NF4Linear":
        packed, absmax = quantize_codes(linear.weight)
        return cls(packed, absmax, linear.out_features, linear.in_features, linear.bias)

    @property
    def weight_shape(self) -> torch.Size:
        return torch.Size((self.out_features, self.in_features))

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        absmax = dequantize_scales(self.scale_codes, self.scale_factor, self.scale_offset)
        return dequantize(self.weight_packed, absmax, self.weight_shape, dtype)

    def forward(self, x: torch.Tensor, lora=None) -> torch.Tensor:
        """`lora` (a serving step's LoraBatch, which model files pass to every projection) is unused here."""
        device = x.device.type
        if torch.is_autocast_enabled(device):  # dequantise straight to the autocast dtype, never to fp32 first
            x = x.to(torch.get_autocast_dtype(device))
        out = _FrozenNF4Matmul.apply(x, self)
        return out + self.bias.to(out.dtype) if self.bias is not None else out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
