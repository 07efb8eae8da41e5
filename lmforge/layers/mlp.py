import torch
import torch.nn.functional as F
from torch import nn

from lmforge.kernels import usable
from lmforge.layers import train_kernels
from lmforge.layers.activation import activation
from lmforge.layers.linear import Linear, linears


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)): the SwiGLU MLP of Llama, Mistral, Qwen and the MoE experts."""

    def __init__(self, hidden: int, intermediate: int, act: str, bias: bool = False):
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate, bias=bias)
        self.up_proj = Linear(hidden, intermediate, bias=bias)
        self.down_proj = Linear(intermediate, hidden, bias=bias)
        self.act = activation(act)

    def forward(self, x: torch.Tensor, lora=None) -> torch.Tensor:
        """`lora`: a serving step's LoraBatch (lmforge/layers/multi_lora.py), handed to each projection."""
        gate, up = linears(x, self.gate_proj, self.up_proj, lora=lora)
        down = self.down_proj
        if self.act is F.silu and type(down) is Linear and \
                (out := train_kernels.silu_mul_linear(gate, up, down.weight, down.bias)) is not None:
            return out  # full fine-tuning in bf16-mixed: the product is recomputed in backward, not kept
        return down(swiglu(gate, up) if self.act is F.silu else self.act(gate) * up, lora)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up: one kernel pass over inference tensors (the halves of the fused gate/up output), a fused
    autograd Function in training on CPU, else eager."""
    if gate.dim() == 2 and (ops := usable(gate, up)) is not None:
        return ops.silu_mul(gate, up)
    if (out := train_kernels.silu_mul(gate, up)) is not None:
        return out
    return F.silu(gate) * up
