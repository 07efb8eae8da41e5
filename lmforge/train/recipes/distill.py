"""Knowledge distillation (`recipe: distill`): the student (full, LoRA or QLoRA) learns a frozen teacher's next-token
distributions on the responses of SFT-format data, in the same loop as SFT (recipes/sft.py: data shards,
accumulation, DDP/FSDP, checkpoints, exact resume).

The objective runs the teacher under no_grad on each micro-batch, then the student, and takes per trained token the
configured divergence and the student's cross-entropy (train/distill.py distill_loss_sum), mixed by kd_ratio. Both
sums are divided by the window's trained tokens on all ranks, as SFT's token loss is, so a window's loss and
gradients are one big batch's. Metrics: loss, kd_loss (the divergence per trained token) and ce_loss; validation
logs them prefixed val_ (val_kd_loss: the held-out divergence from the teacher).

The teacher is built once, in its own dtype, on every rank whole (not sharded under FSDP), and its tokenizer must
map every id to the student's token: checked before the teacher's weights are loaded and before the loop creates
the run directory. Teacher logits are computed on the fly: no top-k teacher cache is built.
"""

import logging

import torch
from torch import nn

from lmforge.config import TrainConfig
from lmforge.data import Batch
from lmforge.errors import LmforgeError
from lmforge.layers.attention import AttnMeta
from lmforge.models import build_model
from lmforge.models.config import read_config
from lmforge.tokenizer import Tokenizer
from lmforge.train.distill import DistillSettings, check_same_vocabulary, distill_loss_sum
from lmforge.weights.resolve import resolve_model

log = logging.getLogger("lmforge")


class DistillObjective:
    """The distillation loss of a micro-batch, normalised by the window's trained tokens (see the module doc)."""

    def __init__(self, cfg: TrainConfig, model: nn.Module, tokenizer: Tokenizer, device: torch.device):
        d = cfg.distill
        self.settings = DistillSettings(d.loss, d.beta, d.temperature, d.kd_ratio)
        self.model = model
        teacher_dir = resolve_model(d.teacher)
        check_same_vocabulary(tokenizer, Tokenizer.from_dir(teacher_dir), f"distill.teacher {d.teacher}")
        teacher_vocab, student_vocab = read_config(teacher_dir).get("vocab_size"), model.config.get("vocab_size")
        if teacher_vocab != student_vocab:
            raise LmforgeError(f"distill.teacher {d.teacher}: its output layer has {teacher_vocab} logits per token "
                               f"and the student's {student_vocab}; distillation needs a teacher with the student's "
                               f"vocabulary")
        self.teacher = build_model(teacher_dir, teacher_dtype(cfg), device).eval().requires_grad_(False)
        log.info("distillation: teacher %s (%s), %s, temperature %g, kd_ratio %g", teacher_dir,
                 str(next(self.teacher.parameters()).dtype).removeprefix("torch."), d.loss, d.temperature, d.kd_ratio)

    def totals(self, window: list[Batch]) -> list[float]:
        """This rank's trained tokens of the window (the loop sums them over ranks)."""
        return [sum(batch.num_trained_tokens for batch in window)]

    def loss(self, runner: nn.Module, batch: Batch, totals: list[float]) -> tuple[torch.Tensor, dict[str, float]]:
        tokens = max(totals[0], 1)
        meta = AttnMeta.for_training(batch.cu_seqlens, batch.prefix_lens)
        with torch.no_grad():
            teacher_hidden = self.teacher(batch.input_ids, batch.positions, meta)
        hidden = runner(batch.input_ids, batch.positions, meta)
        kd_sum, ce_sum = distill_loss_sum(self.model, hidden, self.teacher, teacher_hidden, batch.labels,
                                          self.settings)
        loss = self.settings.mix(kd_sum, ce_sum) / tokens
        return loss, {"kd_loss": kd_sum.item(), "ce_loss": ce_sum.item()}

    def summary(self, sums: dict[str, float], totals: list[float]) -> dict[str, float]:
        tokens = max(totals[0], 1)
        kd, ce = sums["kd_loss"] / tokens, sums["ce_loss"] / tokens
        return {"loss": self.settings.kd_ratio * kd + (1 - self.settings.kd_ratio) * ce, "kd_loss": kd,
                "ce_loss": ce, "tokens": int(totals[0])}


def teacher_dtype(cfg: TrainConfig) -> torch.dtype:
    """The teacher is frozen: under bf16-mixed it is stored in bfloat16 (half the memory, no autocast casts)."""
    if cfg.distill.teacher_dtype != "auto":
        return getattr(torch, cfg.distill.teacher_dtype)
    return torch.bfloat16 if cfg.precision == "bf16-mixed" else torch.float32
