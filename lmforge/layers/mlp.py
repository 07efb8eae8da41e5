import torch
from torch import nn

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = linears(x, self.gate_proj, self.up_proj)
        return self.down_proj(self.act(gate) * up)
