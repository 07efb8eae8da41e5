"""Multi-LoRA serving: several adapters applied to one flat batch, each token getting its own request's adapter.

The engine wraps every servable projection in a `MultiLoRALinear` that holds `max_loras` adapter slots side by side
(zero-padded to `max_rank`); the model runner builds one `LoraBatch` per step (which tokens use which slot) and hands
it over as `AttnMeta.lora`, a forward argument like the rest of the step's metadata. Model files pass it to each
projection (`self.o_proj(x, meta.lora)`); plain layers ignore it. Training uses `LoRALinear` (lmforge/layers/lora.py).
"""

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.layers.linear import Linear

# Projections whose call sites pass the step's LoraBatch (attention, dense and shared-expert MLPs of every family).
SERVABLE = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_proj", "up_proj", "down_proj", "gate_up_proj")
NO_ADAPTER = -1  # slot of a token served by the base model


@dataclass(frozen=True, slots=True)
class LoraBatch:
    """The adapter tokens of one step: (slot, rows) per adapter in use, rows a slice of the flat batch when that
    adapter's tokens lie end to end, else their indices. Base-model tokens appear in no group."""

    groups: tuple[tuple[int, slice | torch.Tensor], ...]

    @classmethod
    def build(cls, slots: list[int], seqlens: list[int], device: torch.device) -> "LoraBatch | None":
        """slots[i]: the adapter slot of sequence i (NO_ADAPTER for the base); None when no token has an adapter."""
        ranges: dict[int, list[list[int]]] = {}
        start = 0
        for slot, n in zip(slots, seqlens, strict=True):
            if slot != NO_ADAPTER and n:
                spans = ranges.setdefault(slot, [])
                if spans and spans[-1][1] == start:  # neighbours of one adapter: one span
                    spans[-1][1] += n
                else:
                    spans.append([start, start + n])
            start += n
        if not ranges:
            return None
        groups = []
        for slot, spans in ranges.items():
            if len(spans) == 1:
                groups.append((slot, slice(*spans[0])))
            else:
                rows = [i for a, b in spans for i in range(a, b)]
                groups.append((slot, torch.tensor(rows, dtype=torch.long, device=device)))
        return cls(tuple(groups))


def with_adapters(meta, slots: list[int]):
    """The step's AttnMeta with its LoraBatch (unchanged when no sequence of the step uses an adapter)."""
    lora = LoraBatch.build(slots, list(meta.seqlens_q), meta.cu_seqlens_q.device)
    return meta if lora is None else dataclasses.replace(meta, lora=lora)


class MultiLoRALinear(nn.Module):
    """base(x) plus, for each token, x @ A_s^T @ (scaling_s * B_s)^T of the adapter in its slot s.

    Slots are preallocated (`max_loras` x `max_rank`, the model's dtype), so loading never allocates and memory is
    bounded. `ranks[s]` is the rank of slot s's adapter in this layer, 0 when it does not adapt this layer (nothing is
    computed for it). Tokens are grouped by adapter: two small products per adapter in use, none for base tokens."""

    def __init__(self, base_layer: Linear, max_loras: int, max_rank: int):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        w = base_layer.weight
        # Not parameters: they are serving state, outside state_dict (the model keeps its HF names and contents).
        self.register_buffer("lora_a", w.new_zeros(max_loras, max_rank, self.in_features), persistent=False)
        self.register_buffer("lora_b", w.new_zeros(max_loras, max_rank, self.out_features), persistent=False)
        self.ranks = [0] * max_loras

    def forward(self, x: torch.Tensor, lora: LoraBatch | None) -> torch.Tensor:
        # `lora` has no default on purpose: a call site that does not pass it fails at warm-up instead of silently
        # serving the base model to adapter requests.
        return self.add_adapters(x, self.base_layer(x), lora)

    def add_adapters(self, x: torch.Tensor, out: torch.Tensor, lora: LoraBatch | None) -> torch.Tensor:
        """out (this layer's base output for x) plus each token's adapter update, added in place."""
        if lora is None:
            return out
        for slot, rows in lora.groups:
            rank = self.ranks[slot]
            if rank == 0:
                continue
            delta = F.linear(x[rows], self.lora_a[slot, :rank]) @ self.lora_b[slot, :rank]
            if isinstance(rows, slice):
                out[rows] += delta
            else:
                out.index_add_(0, rows, delta)
        return out

    @torch.no_grad()
    def set_slot(self, slot: int, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
        """Slot `slot` computes scaling * B A: a [r, in], b [out, r] as PEFT stores them (scaling folded in fp32)."""
        rank = a.shape[0]
        self.clear_slot(slot)
        self.lora_a[slot, :rank].copy_(a)
        self.lora_b[slot, :rank].copy_((b.float() * scaling).T)
        self.ranks[slot] = rank

    @torch.no_grad()
    def clear_slot(self, slot: int) -> None:
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        self.ranks[slot] = 0

    def extra_repr(self) -> str:
        return f"slots={self.lora_a.shape[0]}, max_rank={self.lora_a.shape[1]}"


def servable(path: str) -> bool:
    """Whether multi-LoRA serving can adapt the linear layer at this module path (not MoE experts or routers)."""
    return path.rpartition(".")[2] in SERVABLE and ".experts." not in path


def add_multi_lora(model: nn.Module, max_loras: int, max_rank: int) -> dict[str, MultiLoRALinear]:
    """Wraps every servable plain Linear of the model in a MultiLoRALinear (empty slots: the base model's outputs);
    returns them by module path, which is the path PEFT's keys name."""
    layers = {}
    for path, module in list(model.named_modules()):
        if type(module) is Linear and servable(path):
            parent, _, name = path.rpartition(".")
            layers[path] = MultiLoRALinear(module, max_loras, max_rank)
            setattr(model.get_submodule(parent), name, layers[path])
    return layers
