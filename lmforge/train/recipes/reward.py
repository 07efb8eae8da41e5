"""Reward models (`recipe: reward`): the decoder with a scalar head `score` (train/reward.py RewardModel) trained by
the Bradley-Terry loss on prompt/chosen/rejected pairs, in the same loop as SFT and DPO (recipes/sft.py: data
shards, accumulation, checkpoints, exact resume). A single process only: `--nproc` / torchrun are refused.

The causal LM is turned into a reward model before LoRA, so that `score` is a module of its own: under LoRA and
QLoRA it is trained in full, in float32 (added to lora.modules_to_save; a plain torch linear, so never a LoRA
target nor quantised), as PEFT trains the head of a sequence-classification model. Every model directory the run
writes (best/, final/, each checkpoint's model files) is a Hugging Face sequence-classification directory with
any adapter merged in (train/reward.py save_reward_model), which transformers' AutoModelForSequenceClassification
and `lmforge eval` load.

Each micro-batch holds whole pairs as two documents each (data/dataset.py PairDataset); a document is scored at its
last token that is not the pad token, as transformers scores it. A window's loss is the per-pair losses summed
and divided by the window's pairs, so it equals one big batch's however the pairs are split. Metrics are TRL's
RewardTrainer's (accuracy, margin, mean_reward) as means over the window's pairs; its min_reward / max_reward are
not logged.
"""

import torch
from torch import nn

from lmforge.config import TrainConfig
from lmforge.data import Batch
from lmforge.layers.attention import AttnMeta
from lmforge.layers.lora import LoraSummary, add_lora
from lmforge.train.recipes.dpo import pair_tokens, trained_per_document
from lmforge.train.reward import RewardModel, accuracy, bradley_terry_loss

HEAD = "score"
METRICS = ("accuracy", "margin", "mean_reward")


def add_reward_lora(model: RewardModel, cfg: TrainConfig) -> LoraSummary:
    """add_lora for a reward model (train/reward.py reward_model_from): the configured adapter on the trunk, the
    head trained in full in float32 (a torch linear, never a LoRA target nor quantised)."""
    lora = cfg.lora.model_copy(update={"modules_to_save": sorted({*cfg.lora.modules_to_save, HEAD})})
    return add_lora(model, lora, quantize=cfg.method == "qlora")


class RewardObjective:
    """The Bradley-Terry loss of a micro-batch of pairs over the window's pairs (see the module doc)."""

    def __init__(self, cfg: TrainConfig, model: RewardModel):
        self.model = model
        self.center_rewards_coefficient = cfg.reward.center_rewards_coefficient

    def totals(self, window: list[Batch]) -> list[float]:
        """This rank's [pairs, tokens] of the window (the loop sums them over ranks)."""
        pairs = tokens = 0
        for batch in window:
            valid = _valid_pairs(batch)  # a validation filler pair counts nothing
            pairs += int(valid.sum())
            tokens += pair_tokens(batch, valid)
        return [pairs, tokens]

    def loss(self, runner: nn.Module, batch: Batch, totals: list[float]) -> tuple[torch.Tensor, dict[str, float]]:
        scores = runner(batch.input_ids, batch.positions, AttnMeta.for_training(batch.cu_seqlens, batch.prefix_lens))
        valid = _valid_pairs(batch)  # a validation filler pair weighs nothing
        chosen, rejected = scores[0::2][valid], scores[1::2][valid]
        loss = bradley_terry_loss(chosen, rejected, None, self.center_rewards_coefficient).sum() / max(totals[0], 1)
        with torch.no_grad():
            stats = {"loss": loss.item(), "accuracy": accuracy(chosen, rejected).sum().item(),
                     "margin": (chosen - rejected).sum().item(), "mean_reward": (chosen + rejected).sum().item() / 2}
        return loss, stats

    def summary(self, sums: dict[str, float], totals: list[float]) -> dict[str, float]:
        pairs = max(totals[0], 1)
        return {"loss": sums["loss"], "tokens": int(totals[1]), **{name: sums[name] / pairs for name in METRICS}}


def _valid_pairs(batch: Batch) -> torch.Tensor:
    counts = trained_per_document(batch)
    return (counts[0::2] > 0) & (counts[1::2] > 0)
