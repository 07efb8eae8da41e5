import torch
import torch.nn.functional as F
from torch import nn

from lmforge.kernels import usable
from lmforge.layers import train_kernels


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back before the weight, as Hugging Face's Llama does. Under autocast the
    output is in the autocast dtype, which the projections reading it would cast to anyway: one cast here instead
    of one per projection (q, k and v each keep their own copy for backward otherwise)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight  # once: each read goes through Module.__getattr__
        if (out := train_kernels.rms_norm(x, weight, self.eps)) is not None:
            return out  # training on CPU: one kernel forward, one backward
        if x.dtype == weight.dtype and (ops := usable(x, weight)) is not None:
            return ops.rms_norm(x, weight, self.eps)  # the same math in one pass
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            return weight.to(dtype) * normed.to(dtype)
        return weight * normed.to(x.dtype)
