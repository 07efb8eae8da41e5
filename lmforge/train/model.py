"""The model a recipe trains: built from the configured checkpoint in the right dtype, adapted (LoRA / QLoRA)
or not, and saved in the ecosystem's formats (HF directory for full runs, PEFT adapter otherwise)."""

import logging
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from lmforge.config import TrainConfig
from lmforge.layers.lora import add_lora
from lmforge.models import build_model
from lmforge.tokenizer import Tokenizer
from lmforge.train.recipes.reward import add_reward_lora
from lmforge.train.reward import reward_model_from, save_reward_model
from lmforge.weights.hf_dir import save_state_dict, write_side_files
from lmforge.weights.peft import write_adapter
from lmforge.weights.resolve import resolve_model

log = logging.getLogger("lmforge")


def weights_dtype(cfg: TrainConfig) -> torch.dtype:
    """Trained weights stay float32 (bf16 updates of small learning rates round away); frozen ones (the base of
    LoRA) are stored in the compute dtype, which halves their memory and skips autocast's casts."""
    if cfg.model.dtype != "auto":
        return getattr(torch, cfg.model.dtype)
    if cfg.method != "full" and cfg.precision == "bf16-mixed":
        return torch.bfloat16
    return torch.float32


def build_trainable(cfg: TrainConfig, device: torch.device) -> tuple[nn.Module, Tokenizer, Path]:
    model_dir = resolve_model(cfg.model.path)
    tokenizer = Tokenizer.from_dir(model_dir)
    model = build_model(model_dir, weights_dtype(cfg), device)
    if cfg.recipe == "reward":  # the head before LoRA, so that it is trained in full (recipes/reward.py)
        model = reward_model_from(model, seed=cfg.seed)
    if cfg.method == "full":
        trainable = sum(p.numel() for p in model.parameters())
        log.info("full fine-tuning: %s trainable parameters", f"{trainable:,}")
    elif cfg.recipe == "reward":
        log.info("%s: %s (head trained in full)", cfg.method, add_reward_lora(model, cfg))
    else:
        summary = add_lora(model, cfg.lora, quantize=cfg.method == "qlora")
        log.info("%s: %s", cfg.method, summary)
    if cfg.activation_checkpointing:
        model.model.checkpoint_every = cfg.activation_checkpointing_every
    return model.train(), tokenizer, model_dir


def gathered_weights(model: nn.Module, cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """What the model files of a checkpoint hold, whole and on the CPU: every weight of a full run (tied ones
    once), the trained ones (adapter, modules_to_save) of a LoRA run. Under FSDP this gathers the shards, so every
    rank calls it; only rank 0 receives the tensors (the others get {})."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        named = model.named_parameters()
        return {n: p.detach().cpu() for n, p in named if cfg.method == "full" or p.requires_grad}
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=cfg.method != "full")
    state = get_model_state_dict(model, options=options)
    keep = {n for n, _ in model.named_parameters()}  # without the aliases of tied weights
    return {n: t for n, t in state.items() if n in keep}


def save_trainable(weights: dict[str, torch.Tensor], cfg: TrainConfig, model_dir: Path, hf_config: dict,
                   out: Path, model: nn.Module | None = None) -> None:
    """A full run saves an HF directory with the tokenizer; LoRA / QLoRA a PEFT adapter directory; a reward model
    (recipe: reward; `model`, whole in this process) an HF sequence-classification directory, adapter merged in."""
    if cfg.recipe == "reward":
        save_reward_model(model, out, source_dir=model_dir)
    elif cfg.method == "full":
        save_state_dict(weights, Path(out))
        write_side_files(hf_config, Path(out), next(iter(weights.values())).dtype, source_dir=model_dir)
    else:
        write_adapter(weights, out, cfg.lora, base_model=str(cfg.model.path))
