"""LoRA as data: `LoRALinear` wraps a frozen base linear (full precision or NF4) and adds a low-rank update.

Parameter names are PEFT's (`base_layer`, `lora_A.weight`, `lora_B.weight`, `lora_magnitude_vector`), so the
state-dict key of every adapter tensor is PEFT's saved key without the `base_model.model.` prefix.
"""

import contextlib
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from lmforge import kernels
from lmforge.errors import LmforgeError
from lmforge.layers.linear import Linear, active_derived, product, project
from lmforge.layers.nf4 import NF4Linear

if TYPE_CHECKING:
    from lmforge.config.schema import LoraConfig

OUTPUT_LAYER = "lm_head"  # never adapted by all-linear nor quantised (QLoRA keeps it in full precision)


def lora_scaling(alpha: float, rank: int, rslora: bool = False) -> float:
    """The factor of the update B @ A: alpha / r, or alpha / sqrt(r) with rank-stabilised LoRA (PEFT's use_rslora)."""
    return alpha / (math.sqrt(rank) if rslora else rank)


class LoRALinear(nn.Module):
    """base(x) + dropout(x) @ A^T @ B^T * scaling, scaling = lora_scaling(alpha, r, rslora).

    DoRA rescales each output row of the updated weight W + scaling * B @ A to a trained magnitude m: the output is
    base(x) + (m / |W + s B A| - 1) * (x @ W^T) + (m / |W + s B A|) * s * lora(x), the row norm treated as a
    constant in backward (as the DoRA paper and PEFT do). `disabled = True` computes the base only."""

    def __init__(self, base_layer: Linear | NF4Linear, rank: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False, dora: bool = False, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.rank, self.alpha, self.rslora, self.dora = rank, alpha, rslora, dora
        self.scaling = lora_scaling(alpha, rank, rslora)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        nf4 = isinstance(base_layer, NF4Linear)
        device = base_layer.weight_packed.device if nf4 else base_layer.weight.device
        # nn.Linear's default init is PEFT's for A (kaiming-uniform, a=sqrt(5)); B starts at zero: no change at step 0
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=device, dtype=dtype)
        nn.init.zeros_(self.lora_B.weight)
        self.lora_magnitude_vector = None
        if dora:  # starts at the base rows' norms, so the layer starts equal to its base
            norms = torch.linalg.vector_norm(self.base_weight(torch.float32), dim=1)
            self.lora_magnitude_vector = nn.Parameter(norms.to(dtype))
        self.disabled = False
        self.merged = False

    def base_weight(self, dtype: torch.dtype) -> torch.Tensor:
        if isinstance(self.base_layer, NF4Linear):
            return self.base_layer.dequantized(dtype)
        return self.base_layer.weight.to(dtype)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A in fp32 [out, in]: what LoRA adds to the base weight (before DoRA's rescaling)."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def forward(self, x: torch.Tensor, lora=None) -> torch.Tensor:
        """`lora` (a serving step's LoraBatch, which model files pass to every projection) is unused here."""
        out = self.base_layer(x)  # the base module's own path: inference fast paths stay in use
        if self.disabled or self.merged:
            return out
        derived = active_derived()
        if derived is not None and (factors := derived.adapters.get(self)) is not None:
            # a serving engine's step: its copies of A and scaling * B on the CPU kernels (recorded by step graphs)
            return out + project(project(x, factors[0], (self, 0)), factors[1], (self, 1))
        dtype = x.dtype  # under autocast, F.linear casts again to the autocast dtype
        h = self.lora_dropout(x)
        if kernels.in_bitwise() and not self.dora:  # an engine's step and a training step: the same products
            return out + product(product(h, self.lora_A.weight) * self.scaling, self.lora_B.weight)
        if not self.dora:  # the scaling on the rank-r activations: r numbers per token instead of out_features
            down = F.linear(h, self.lora_A.weight.to(dtype)) * self.scaling
            return out + F.linear(down, self.lora_B.weight.to(dtype))
        lora = F.linear(F.linear(h, self.lora_A.weight.to(dtype)), self.lora_B.weight.to(dtype))
        weight = self.base_weight(out.dtype)
        with torch.no_grad():  # the row norm is a constant for autograd
            delta = (self.lora_B.weight @ self.lora_A.weight).to(out.dtype)
            norm = torch.linalg.vector_norm(weight + self.scaling * delta, dim=1)
        scale = (self.lora_magnitude_vector / norm).to(out.dtype)
        if isinstance(self.lora_dropout, nn.Dropout) and self.training:
            base = F.linear(h.to(out.dtype), weight)  # the base term must see the same dropped input as LoRA
        else:
            base = out - self.base_layer.bias.to(out.dtype) if self.base_layer.bias is not None else out
        return out + (scale - 1) * base + scale * lora.to(out.dtype) * self.scaling

    @torch.no_grad()
    def merge(self) -> Linear:
        """Folds the update into the base weight in place (rounded once, to the base dtype) and returns the base
        layer, which then computes what this layer did; this layer itself computes the base only from now on."""
        if isinstance(self.base_layer, NF4Linear):
            raise LmforgeError("cannot merge a LoRA adapter into NF4 (QLoRA) weights; merge it into the "
                               "full-precision base instead: lmforge merge BASE ADAPTER OUT")
        if self.merged:
            return self.base_layer
        weight = self.base_layer.weight
        merged = weight.float() + self.delta_weight()
        if self.dora:
            merged *= (self.lora_magnitude_vector.float() / torch.linalg.vector_norm(merged, dim=1))[:, None]
        weight.copy_(merged)  # in place: fused views and the parameter object stay valid
        self.merged = True
        return self.base_layer

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}, dora={self.dora}"


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def linear_layers(model: nn.Module) -> dict[str, Linear]:
    """Every lmforge Linear of the model by module path, skipping bases already wrapped by a LoRALinear."""
    wrapped = {name + ".base_layer" for name in lora_layers(model)}
    return {name: m for name, m in model.named_modules() if type(m) is Linear and name not in wrapped}


def matches(path: str, names: list[str]) -> bool:
    """PEFT's rule for a list of target names: the module path equals one or ends with '.' + one."""
    return any(path == n or path.endswith("." + n) for n in names)


@contextlib.contextmanager
def lora_disabled(model: nn.Module) -> Iterator[None]:
    """The base model's outputs inside the block (DPO's reference policy); `modules_to_save` stay as trained."""
    layers = list(lora_layers(model).values())
    before = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield
    finally:
        for layer, was in zip(layers, before, strict=True):
            layer.disabled = was


def merge_lora(model: nn.Module) -> int:
    """Merges every LoRALinear and puts its base layer back in its place (the HF parameter names return);
    returns how many layers were merged."""
    layers = lora_layers(model)
    for path, layer in layers.items():
        set_submodule(model, path, layer.merge())
    return len(layers)


def set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


@dataclass(frozen=True, slots=True)
class LoraSummary:
    trainable: int  # parameters that receive gradients
    total: int  # all parameters, an NF4 weight counted by its number of weights
    adapted: tuple[str, ...]  # paths of the LoRALinear modules
    saved: tuple[str, ...]  # paths of the modules trained in full (modules_to_save)
    quantized: int  # NF4 layers

    def __str__(self) -> str:
        share = 100 * self.trainable / self.total if self.total else 0.0
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {share:.4f}"


def add_lora(model: nn.Module, cfg: "LoraConfig", quantize: bool = False) -> LoraSummary:
    """Freezes the model, wraps the linear layers `cfg.target_modules` names in LoRALinear and makes
    `cfg.modules_to_save` trainable; quantize=True (QLoRA) first turns every linear layer but the LM head (and
    modules_to_save) into NF4."""
    _check_unadapted(model)
    linears = linear_layers(model)
    return apply_lora(model, target_paths(linears, cfg.target_modules), module_paths(model, cfg.modules_to_save),
                      cfg, quantize)


def apply_lora(model: nn.Module, targets: list[str], saved: list[str], cfg: "LoraConfig", quantize: bool = False,
               trainable: bool = True) -> LoraSummary:
    """add_lora on explicit module paths (a loaded adapter names its modules itself); trainable=False leaves
    every parameter frozen (serving, merging)."""
    _check_unadapted(model)
    if both := sorted(set(targets) & set(saved)):
        raise LmforgeError(f"{both[0]} is both a LoRA target and in modules_to_save; choose one")
    for p in model.parameters():
        p.requires_grad_(False)
    quantized = 0
    if quantize:
        for path, linear in linear_layers(model).items():
            if path.rpartition(".")[2] != OUTPUT_LAYER and path not in saved:
                set_submodule(model, path, NF4Linear.from_linear(linear))
                quantized += 1
    for path in targets:
        set_submodule(model, path, LoRALinear(model.get_submodule(path), cfg.rank, cfg.alpha, cfg.dropout,
                                              cfg.rslora, cfg.dora))
    for path in saved:  # a frozen copy (serving, merging) keeps the model's dtype
        (_train_in_full if trainable else _untie)(model, model.get_submodule(path))
    if not trainable:
        for p in model.parameters():
            p.requires_grad_(False)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    total += sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, NF4Linear))
    return LoraSummary(trained, total, tuple(targets), tuple(saved), quantized)


def _check_unadapted(model: nn.Module) -> None:
    if lora_layers(model):
        raise LmforgeError("the model already has LoRA layers; merge them (merge_lora) or build a fresh model "
                           "before adding another adapter")


def target_paths(linears: dict[str, Linear], target_modules: "list[str] | str",
                 where: str = "lora.target_modules") -> list[str]:
    names = sorted({path.rpartition(".")[2] for path in linears})
    if target_modules == "all-linear":
        return [path for path in linears if path.rpartition(".")[2] != OUTPUT_LAYER]
    for name in target_modules:
        if not any(matches(path, [name]) for path in linears):
            raise LmforgeError(f"{where}: {name!r} matches no linear layer of the model; its linear "
                               f"layers are named {', '.join(names)} (or use all-linear)")
    return [path for path in linears if matches(path, target_modules)]


def module_paths(model: nn.Module, names: list[str], where: str = "lora.modules_to_save") -> list[str]:
    """The modules `modules_to_save` names (PEFT's rule: the path ends with the name); each name must match."""
    paths = [path for path, _ in model.named_modules() if path and matches(path, names)]
    for name in names:
        if not any(matches(path, [name]) for path in paths):
            top = ", ".join(path for path, _ in model.named_modules() if path and path.count(".") <= 1)
            raise LmforgeError(f"{where}: {name!r} matches no module of the model (modules: {top})")
    return paths


def _train_in_full(model: nn.Module, module: nn.Module) -> None:
    """Makes a module trainable, in float32 (bf16 updates of small learning rates round away; autocast casts
    for the products); a parameter shared with another module (tied embeddings) gets its own copy first, as
    PEFT's copy of a saved module does, so training it leaves the other module as it was."""
    _untie(model, module)
    module.to(torch.float32)
    for p in module.parameters():
        p.requires_grad_(True)


def _untie(model: nn.Module, module: nn.Module) -> None:
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    for name, p in list(module.named_parameters()):
        if uses[id(p)] > 1:
            owner, _, attr = name.rpartition(".")
            setattr(module.get_submodule(owner) if owner else module,
                    attr, nn.Parameter(p.detach().clone(), requires_grad=False))
