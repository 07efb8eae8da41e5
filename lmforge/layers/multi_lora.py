"""Multi-LoRA serving: several adapters applied to one flat batch, each token getting its own request's adapter.

The engine wraps every servable projection in a `MultiLoRALinear` that holds `max_loras` adapter slots side by side
(zero-padded to `max_rank`); the model runner builds one `LoraBatch` per step (which tokens use which slot) and hands
it over as `AttnMeta.lora`, a forward argument like the rest of the step's metadata. Model files pass it to each
projection (`self.o_proj(x, meta.lora)`); plain layers ignore it. Training uses `LoRALinear` (lmforge/layers/lora.py).
"""

from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import nn

from lmforge.layers.linear import Linear, project
from lmforge.layers.quant_linear import QuantLinear

# Projections whose call sites pass the step's LoraBatch (attention, dense and shared-expert MLPs of every family).
SERVABLE = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_proj", "up_proj", "down_proj", "gate_up_proj")
NO_ADAPTER = -1  # slot of a token served by the base model


@dataclass(frozen=True, slots=True)
class LoraBatch:
    """Which adapter each token of one step uses: `mask` [num_tokens, max_loras * max_rank] is 1 on the columns of
    the token's slot (all 0 for a base-model token), `slots` the slots some token uses."""

    slots: frozenset[int]
    mask: torch.Tensor

    @classmethod
    def build(cls, slots: list[int], seqlens: list[int], max_loras: int, max_rank: int, device: torch.device,
              dtype: torch.dtype) -> "LoraBatch | None":
        """slots[i]: the adapter slot of sequence i (NO_ADAPTER for the base); None when no token has an adapter."""
        used = frozenset(s for s, n in zip(slots, seqlens, strict=True) if s != NO_ADAPTER and n)
        if not used:
            return None
        per_token = torch.tensor(slots, device=device).repeat_interleave(torch.tensor(seqlens, device=device))
        adapted = per_token != NO_ADAPTER
        onehot = torch.zeros(len(per_token), max_loras, dtype=dtype, device=device)
        onehot[adapted.nonzero()[:, 0], per_token[adapted]] = 1
        return cls(used, onehot.repeat_interleave(max_rank, dim=1))


class MultiLoRALinear(nn.Module):
    """base(x) plus, for each token, x @ A_s^T @ (scaling_s * B_s)^T of the adapter in its slot s.

    The slots lie side by side in two preallocated matrices (the model's dtype, each adapter zero-padded to
    `max_rank`): `lora_a` [max_loras * max_rank, in] holds every A, `lora_b` [out, max_loras * max_rank] every scaled
    B. A step with adapter tokens computes h = x @ lora_a^T for every slot at once, zeroes each token's columns of
    other slots (`LoraBatch.mask`) and adds h @ lora_b^T: two products whatever the mix of adapters, through the same
    CPU fast paths as the base (packed weights, AMX), at the cost of computing all max_loras * max_rank columns.
    Loading never allocates, so memory is bounded. `ranks[s]` is slot s's rank in this layer, 0 when its adapter
    does not adapt this layer: a step none of whose adapters adapts the layer computes the base only."""

    def __init__(self, base_layer: Linear | QuantLinear, max_loras: int, max_rank: int):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.max_rank = max_rank
        # over a quantised base the adapters stay floating point, in the dtype of the layer it replaced
        w = base_layer.weight if type(base_layer) is Linear else base_layer.scales.to(base_layer.dtype)
        # Not parameters: they are serving state, outside state_dict (the model keeps its HF names and contents).
        self.register_buffer("lora_a", w.new_zeros(max_loras * max_rank, self.in_features), persistent=False)
        self.register_buffer("lora_b", w.new_zeros(self.out_features, max_loras * max_rank), persistent=False)
        self._packed_a, self._packed_b = SimpleNamespace(_packed=None), SimpleNamespace(_packed=None)
        self.ranks = [0] * max_loras

    def forward(self, x: torch.Tensor, lora: LoraBatch | None) -> torch.Tensor:
        # `lora` has no default on purpose: a call site that does not pass it fails at warm-up instead of silently
        # serving the base model to adapter requests.
        return self.add_adapters(x, self.base_layer(x), lora)

    def add_adapters(self, x: torch.Tensor, out: torch.Tensor, lora: LoraBatch | None) -> torch.Tensor:
        """out (this layer's base output for x) plus each token's adapter update, added in place."""
        if lora is None or not any(self.ranks[s] for s in lora.slots):
            return out
        h = project(x, self.lora_a, self._packed_a).mul_(lora.mask)
        return out.add_(project(h, self.lora_b, self._packed_b))

    @torch.no_grad()
    def set_slot(self, slot: int, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
        """Slot `slot` computes scaling * B A: a [r, in], b [out, r] as PEFT stores them (scaling folded in fp32)."""
        rank = a.shape[0]
        self.clear_slot(slot)
        start = slot * self.max_rank
        self.lora_a[start:start + rank].copy_(a)
        self.lora_b[:, start:start + rank].copy_(b.float() * scaling)
        self.ranks[slot] = rank

    @torch.no_grad()
    def clear_slot(self, slot: int) -> None:
        columns = slice(slot * self.max_rank, (slot + 1) * self.max_rank)
        self.lora_a[columns].zero_()
        self.lora_b[:, columns].zero_()
        self.ranks[slot] = 0

    def extra_repr(self) -> str:
        return f"slots={len(self.ranks)}, max_rank={self.max_rank}"


def servable(path: str) -> bool:
    """Whether multi-LoRA serving can adapt the linear layer at this module path (not MoE experts or routers)."""
    return path.rpartition(".")[2] in SERVABLE and ".experts." not in path


def add_multi_lora(model: nn.Module, max_loras: int, max_rank: int) -> dict[str, MultiLoRALinear]:
    """Wraps every servable plain Linear or QuantLinear of the model in a MultiLoRALinear (empty slots: the base
    model's outputs); returns them by module path, which is the path PEFT's keys name."""
    layers = {}
    for path, module in list(model.named_modules()):
        if type(module) in (Linear, QuantLinear) and servable(path):
            parent, _, name = path.rpartition(".")
            layers[path] = MultiLoRALinear(module, max_loras, max_rank)
            setattr(model.get_submodule(parent), name, layers[path])
    return layers
