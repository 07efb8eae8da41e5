"""What a run will hold in memory, estimated from the model's config.json alone (no weights are loaded):
`lmforge config check` prints it before anyone waits for a download."""

from dataclasses import dataclass

import torch

from lmforge.config import TrainConfig
from lmforge.layers.linear import Linear
from lmforge.models import build_args
from lmforge.train.loss import CHUNK_ROWS
from lmforge.train.model import weights_dtype
from lmforge.train.preference import REFERENCE_FREE
from lmforge.train.recipes.distill import teacher_dtype
from lmforge.train.recipes.dpo import precomputes_reference

NF4_BYTES = 0.5 + 4 / 64 / 4 + 4 / 256 / 64  # 4-bit codes, 8-bit scales per 64, fp32 scale per 256 scales


@dataclass(frozen=True)
class MemoryPlan:
    parameters: int
    trainable: int
    weight_bytes: float
    grad_bytes: float
    optimizer_bytes: float
    activation_bytes: float
    tokens_per_micro_batch: int
    reference_bytes: float = 0.0  # recipe dpo in a full run: the frozen copy of the starting weights
    teacher_bytes: float = 0.0  # recipe distill: the frozen teacher
    kv_cache_bytes: float = 0.0  # recipe grpo: the rollout engine's KV pool (freed while training: it sleeps)

    @property
    def total_bytes(self) -> float:
        # the rollout engine's pool and the training step's activations never live at once (the engine sleeps)
        return (self.weight_bytes + self.grad_bytes + self.optimizer_bytes + max(self.activation_bytes,
                                                                                self.kv_cache_bytes)
                + self.reference_bytes + self.teacher_bytes)

    def lines(self) -> list[str]:
        gib = 2**30
        return [
            f"parameters: {self.parameters:,} ({self.trainable:,} trainable, "
            f"{100 * self.trainable / max(self.parameters, 1):.2f}%)",
            f"weights: {self.weight_bytes / gib:.2f} GiB",
            f"gradients: {self.grad_bytes / gib:.2f} GiB (fp32, trainable parameters only)",
            f"optimizer state: {self.optimizer_bytes / gib:.2f} GiB (AdamW: two fp32 moments)",
            *([f"reference model: {self.reference_bytes / gib:.2f} GiB (a frozen copy of the starting weights)"]
              if self.reference_bytes else []),
            *([f"rollout KV cache: {self.kv_cache_bytes / gib:.2f} GiB (grpo: allocated while sampling, freed while "
               "training)"] if self.kv_cache_bytes else []),
            *([f"teacher model: {self.teacher_bytes / gib:.2f} GiB (distill: frozen, whole on every process)"]
              if self.teacher_bytes else []),
            f"activations: {self.activation_bytes / gib:.2f} GiB at {self.tokens_per_micro_batch:,} tokens per "
            f"micro-batch (estimate)",
            f"total: {self.total_bytes / gib:.2f} GiB (estimate; the allocator and the framework add more)",
        ]


def memory_plan(cfg: TrainConfig, hf_config: dict, processes: int = 1,
                teacher_config: dict | None = None) -> MemoryPlan:
    """Per process; with several processes and distributed.strategy fsdp, weights, gradients and optimizer state
    are split between them (auto decides at start-up, from the device's memory: the plan assumes DDP).
    teacher_config: the distillation teacher's config.json, when there is one."""
    cls, args = build_args(hf_config)
    model = _meta_model(hf_config)
    total = sum(p.numel() for p in model.parameters())
    teacher = 0.0
    if teacher_config is not None:
        teacher = sum(p.numel() for p in _meta_model(teacher_config).parameters()) * teacher_dtype(cfg).itemsize
    frozen_bytes = torch.finfo(weights_dtype(cfg)).bits // 8
    if cfg.method == "full":
        trainable, weight_bytes = total, float(total * frozen_bytes)
    else:
        trainable, quantised = _adapter_parameters(model, cfg)
        per_weight = NF4_BYTES if cfg.method == "qlora" else frozen_bytes
        weight_bytes = quantised * per_weight + (total - quantised) * frozen_bytes + trainable * 4.0
    pairs = cfg.recipe in ("dpo", "reward")  # a row holds whole pairs: up to two documents of max_seq_len
    tokens = cfg.micro_batch_size * cfg.data.max_seq_len * (2 if pairs else 1)
    reference = 0.0
    kept = cfg.preference.loss == "kto" or not precomputes_reference(cfg)  # else freed before training starts
    if cfg.method == "full" and ((cfg.recipe == "dpo" and cfg.preference.loss not in REFERENCE_FREE and kept)
                                 or (cfg.recipe == "grpo" and cfg.grpo.beta)):
        reference = total * (2.0 if cfg.precision == "bf16-mixed" else 4.0)
    compute = 4 if cfg.precision == "fp32" else 2
    h, kv = args.hidden_size, args.num_key_value_heads * args.head_dim
    inter = getattr(args, "intermediate_size", 4 * h)
    # saved for backward per token and layer: norms' inputs and outputs, q/k/v, attention output, residuals,
    # the MLP's gate, up and product (a Llama-shaped count; MoE and other families are close enough for a plan)
    per_token_layer = (8 * h + 2 * kv + 3 * inter) * compute + 2 * h * 4
    layers = args.num_hidden_layers
    # a recomputed block keeps only its input, until backward rebuilds the rest (one block at a time)
    recomputed = -(-layers // cfg.activation_checkpointing_every) if cfg.activation_checkpointing else 0
    kept_layers = layers - recomputed + (1 if recomputed else 0)
    activations = tokens * (per_token_layer * kept_layers + recomputed * h * compute)
    activations += CHUNK_ROWS * args.vocab_size * 4 * 2 + tokens * h * 4  # one chunk of logits, hidden grads
    split = processes if processes > 1 and cfg.distributed.strategy == "fsdp" else 1
    kv_cache = cfg.grpo.kv_cache_memory * 2**30 if cfg.recipe == "grpo" else 0.0
    return MemoryPlan(total, trainable, weight_bytes / split, trainable * 4.0 / split, trainable * 8.0 / split,
                      activations, tokens, reference, teacher, kv_cache)


def _meta_model(hf_config: dict) -> torch.nn.Module:
    cls, args = build_args(hf_config)
    with torch.device("meta"):
        return cls(args)


def _adapter_parameters(model: torch.nn.Module, cfg: TrainConfig) -> tuple[int, int]:
    """(LoRA + modules_to_save parameters, weights of the linear layers inside the decoder blocks)."""
    lora, targets = cfg.lora, cfg.lora.target_modules
    trainable = quantised = 0
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, Linear):
            if ".layers." in f".{name}":
                quantised += module.weight.numel()
            if leaf != "lm_head" and (targets == "all-linear" or leaf in targets):
                trainable += lora.rank * (module.in_features + module.out_features)
                trainable += module.out_features if lora.dora else 0
        if leaf in lora.modules_to_save:
            trainable += sum(p.numel() for p in module.parameters())
    return trainable, quantised
