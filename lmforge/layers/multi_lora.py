"""Multi-LoRA serving: several adapters applied to one flat batch, each token getting its own request's adapter.

The engine wraps every servable projection in a `MultiLoRALinear` that holds `max_loras` adapter slots side by side
(zero-padded to `max_rank`); the model runner builds one `LoraBatch` per step (which tokens use which slot) and hands
it over as `AttnMeta.lora`, a forward argument like the rest of the step's metadata. Model files pass it to each
projection (`self.o_proj(x, meta.lora)`); plain layers ignore it. Training uses `LoRALinear` (lmforge/layers/lora.py).
"""

from dataclasses import dataclass

import torch
from torch import nn

from lmforge.layers.linear import Linear, project
from lmforge.layers.quant_linear import QuantLinear

# Projections whose call sites pass the step's LoraBatch (attention, dense and shared-expert MLPs of every family).
SERVABLE = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_proj", "up_proj", "down_proj", "gate_up_proj")
NO_ADAPTER = -1  # slot of a token served by the base model


@dataclass(frozen=True, slots=True)
class LoraBatch:
    """Which tokens of one step use which adapter slot: `rows[s]` selects the tokens of slot s in the flat batch (a
    slice when they lie end to end, else an index tensor); tokens in no group are served by the base model."""

    rows: dict[int, slice | torch.Tensor]
    per_seq: tuple[int, ...] = ()  # the slot of each sequence of the step (NO_ADAPTER: none), as built from

    @property
    def slots(self) -> frozenset[int]:
        return frozenset(self.rows)

    @classmethod
    def build(cls, slots: list[int], seqlens: list[int], device: torch.device) -> "LoraBatch | None":
        """slots[i]: the adapter slot of sequence i (NO_ADAPTER for the base); None when no token has an adapter."""
        spans: dict[int, list[tuple[int, int]]] = {}
        start = 0
        for slot, n in zip(slots, seqlens, strict=True):
            if slot != NO_ADAPTER and n:
                runs = spans.setdefault(slot, [])
                if runs and runs[-1][1] == start:  # continues the slot's previous run
                    runs[-1] = (runs[-1][0], start + n)
                else:
                    runs.append((start, start + n))
            start += n
        if not spans:
            return None
        rows = {slot: slice(*runs[0]) if len(runs) == 1 else
                torch.cat([torch.arange(a, b) for a, b in runs]).to(device) for slot, runs in spans.items()}
        return cls(rows, tuple(slots))


class MultiLoRALinear(nn.Module):
    """base(x) plus, for each token, x @ A_s^T @ (scaling_s * B_s)^T of the adapter in its slot s.

    The slots are preallocated side by side (the model's dtype, each adapter zero-padded to `max_rank`): `lora_a`
    [max_loras, max_rank, in] holds every A, `lora_b` [max_loras, out, max_rank] every scaled B. Each slot a step
    uses multiplies only the rows of its own tokens (selected, never masked: a 0/1 mask would still carry another
    slot's NaN or Inf into a row, as 0 * NaN = NaN), through the same CPU fast paths as the base (packed weights,
    AMX). Loading never allocates, so memory is bounded. `ranks[s]` is slot s's rank in this layer, 0 when its
    adapter does not adapt this layer: a step none of whose adapters adapts the layer computes the base only."""

    def __init__(self, base_layer: Linear | QuantLinear, max_loras: int, max_rank: int):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.max_rank = max_rank
        # over a quantised base the adapters stay floating point, in the dtype of the layer it replaced
        w = base_layer.weight if type(base_layer) is Linear else base_layer.scales.to(base_layer.dtype)
        # Not parameters: they are serving state, outside state_dict (the model keeps its HF names and contents).
        self.register_buffer("lora_a", w.new_zeros(max_loras, max_rank, self.in_features), persistent=False)
        self.register_buffer("lora_b", w.new_zeros(max_loras, self.out_features, max_rank), persistent=False)
        self.ranks = [0] * max_loras

    def forward(self, x: torch.Tensor, lora: LoraBatch | None) -> torch.Tensor:
        # `lora` has no default on purpose: a call site that does not pass it fails at warm-up instead of silently
        # serving the base model to adapter requests.
        return self.add_adapters(x, self.base_layer(x), lora)

    def add_adapters(self, x: torch.Tensor, out: torch.Tensor, lora: LoraBatch | None) -> torch.Tensor:
        """out (this layer's base output for x) plus each token's adapter update, added in place."""
        if lora is None:
            return out
        for slot, rows in lora.rows.items():
            if not self.ranks[slot]:
                continue
            # (self, slot, ...) name the packed copies the engine keeps of this slot's A and B
            update = project(project(x[rows], self.lora_a[slot], (self, slot, 0)), self.lora_b[slot], (self, slot, 1))
            if isinstance(rows, slice):
                out[rows] += update
            else:
                out.index_add_(0, rows, update)
        return out

    @torch.no_grad()
    def set_slot(self, slot: int, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
        """Slot `slot` computes scaling * B A: a [r, in], b [out, r] as PEFT stores them (scaling folded in fp32).
        Raises ValueError, leaving the slot empty, when a value is not finite in the slot's dtype."""
        rank = a.shape[0]
        self.clear_slot(slot)
        self.lora_a[slot, :rank].copy_(a)
        self.lora_b[slot, :, :rank].copy_(b.float() * scaling)
        if not (self.lora_a[slot].isfinite().all() and self.lora_b[slot].isfinite().all()):
            self.clear_slot(slot)
            raise ValueError(f"the adapter's values are not all finite in {self.lora_a.dtype} (NaN, or too large "
                             "once scaled by lora_alpha / r)")
        self.ranks[slot] = rank

    @torch.no_grad()
    def clear_slot(self, slot: int) -> None:
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        self.ranks[slot] = 0

    def extra_repr(self) -> str:
        return f"slots={len(self.ranks)}, max_rank={self.max_rank}"


def servable(path: str) -> bool:
    """Whether multi-LoRA serving can adapt the linear layer at this module path (not MoE experts or routers)."""
    return path.rpartition(".")[2] in SERVABLE and ".experts." not in path


def peft_path(path: str) -> str:
    """The module path PEFT's keys name for a layer at `path`: a tensor-parallel rank's row-parallel products
    (engine/tensor_parallel.py RowParallel) hold theirs one level down, as `.inner`."""
    return path.removesuffix(".inner")


def add_multi_lora(model: nn.Module, max_loras: int, max_rank: int) -> dict[str, MultiLoRALinear]:
    """Wraps every servable plain Linear or QuantLinear of the model in a MultiLoRALinear (empty slots: the base
    model's outputs); returns them by the module path PEFT's keys name."""
    layers = {}
    for path, module in list(model.named_modules()):
        if type(module) in (Linear, QuantLinear) and servable(peft_path(path)):
            parent, _, name = path.rpartition(".")
            layers[peft_path(path)] = MultiLoRALinear(module, max_loras, max_rank)
            setattr(model.get_submodule(parent), name, layers[peft_path(path)])
    return layers
