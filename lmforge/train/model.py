"""The model a recipe trains: built from the configured checkpoint in the right dtype, adapted (LoRA / QLoRA)
or not, and saved / restored in the ecosystem's formats (HF directory for full runs, PEFT adapter otherwise)."""

import logging
from pathlib import Path

import torch
from torch import nn

from lmforge.config import TrainConfig
from lmforge.layers.lora import add_lora
from lmforge.models import build_model
from lmforge.tokenizer import Tokenizer
from lmforge.weights.hf_dir import load_weights, save_model
from lmforge.weights.peft import load_adapter_weights, save_adapter
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
    if cfg.method == "full":
        trainable = sum(p.numel() for p in model.parameters())
        log.info("full fine-tuning: %s trainable parameters", f"{trainable:,}")
    else:
        summary = add_lora(model, cfg.lora, quantize=cfg.method == "qlora")
        log.info("%s: %s", cfg.method, summary)
    if cfg.activation_checkpointing:
        model.model.checkpoint_every = 1
    return model.train(), tokenizer, model_dir


def save_trainable(model: nn.Module, cfg: TrainConfig, model_dir: Path, out: Path) -> None:
    """A full run saves an HF directory with the tokenizer; LoRA / QLoRA a PEFT adapter directory."""
    if cfg.method == "full":
        save_model(model, model.config, out, source_dir=model_dir)
    else:
        save_adapter(model, out, cfg.lora, base_model=str(cfg.model.path))


def load_trainable(model: nn.Module, cfg: TrainConfig, checkpoint: Path) -> None:
    """Restores the trained weights of a checkpoint written by save_trainable into the same model."""
    if cfg.method == "full":
        load_weights(model, checkpoint, progress=False)
        return
    load_adapter_weights(model, checkpoint)
