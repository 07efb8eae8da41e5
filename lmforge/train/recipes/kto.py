"""KTO (`recipe: dpo` with `preference.loss: kto`) on unpaired prompt/completion/label rows, in the same loop as SFT
and DPO (recipes/sft.py).

Each micro-batch holds whole rows as two documents each (data/dataset.py KTODataset): the row's prompt + completion,
which is trained, then its KL document, the same prompt with another row's completion. The loss is KTO's
(train/preference.py kto_loss, TRL's KTOTrainer loss_type "kto"): a desirable row's term is
desirable_weight * (1 - sigmoid(beta * (logratio - z0))), an undesirable row's
undesirable_weight * (1 - sigmoid(beta * (z0 - logratio))), where logratio is the completion's summed log-prob under
the policy minus under the reference, and z0, the reference point, is the mean of the same difference over the KL
documents, clamped at 0, without gradient. The reference is the starting model, as for DPO: the same weights with
adapters switched off for LoRA / QLoRA, a frozen copy of the starting weights for full fine-tuning.

A window's loss is what one big batch of its rows would give, however they are split into micro-batches and ranks:
z0 is the mean over the KL documents of the whole window on all ranks (totals() computes their log-probs without
gradient before any micro-batch's loss; the loop sums the totals over ranks), and the per-row terms are summed and
divided by the window's rows on all ranks. TRL, by contrast, takes z0 per micro-batch (gathered over ranks).
Metrics are TRL's: kl (z0), rewards/chosen and logps/chosen (means over the window's desirable rows),
rewards/rejected and logps/rejected (over its undesirable rows), rewards/margins (their difference); as in TRL a
metric is left out of a step that has no row of its kind. "tokens" counts both documents of every row, which the
policy runs forward on (the KL documents without gradient).
"""

from dataclasses import dataclass

import torch
from torch import nn

from lmforge import kernels
from lmforge.config import TrainConfig
from lmforge.data import Batch
from lmforge.layers.attention import AttnMeta
from lmforge.layers.lora import lora_disabled
from lmforge.models import build_model
from lmforge.train.preference import PreferenceSettings, kto_loss, sequence_logps
from lmforge.train.recipes.dpo import pair_tokens, trained_per_document

SUMMED = ("rewards/chosen", "logps/chosen", "rewards/rejected", "logps/rejected")


class KTOObjective:
    """The KTO loss of a micro-batch of unpaired rows, normalised by the window's totals (see the module doc)."""

    def __init__(self, cfg: TrainConfig, model: nn.Module, model_dir, device: torch.device):
        from lmforge.train.recipes.sft import autocast  # sft builds this objective: imported here, not at the top

        p = cfg.preference
        self.settings = PreferenceSettings("kto", p.beta, desirable_weight=p.desirable_weight,
                                           undesirable_weight=p.undesirable_weight)
        self.model = model
        self.reference: nn.Module | None = None  # None: the policy with adapters off
        if cfg.method == "full":
            dtype = torch.bfloat16 if cfg.precision == "bf16-mixed" else torch.float32
            self.reference = build_model(model_dir, dtype, device).eval().requires_grad_(False)
        self.autocast = lambda: autocast(cfg, device)  # totals() runs outside the loop's autocast

    def totals(self, window: list[Batch]) -> list[float]:
        """This rank's [desirable rows, undesirable rows, tokens, summed KL gap, KL documents] of the window; the
        KL gap of a row is its KL document's policy minus reference log-prob (the loop sums the totals over
        ranks, so z0 = gap / documents is the mean over the whole window)."""
        desirable = undesirable = tokens = kl_docs = 0
        gap = 0.0
        for batch in window:
            valid = _valid_rows(batch)
            labels = batch.desirable.to(valid.device)
            desirable += int((valid & labels).sum())
            undesirable += int((valid & ~labels).sum())
            tokens += pair_tokens(batch, valid)
            kl = _documents(batch, odd=True)
            with torch.no_grad(), self.autocast(), kernels.training_forward():  # the policy's step kernels
                policy = self._logps(self.model, kl)
                reference = self._reference_logps(kl)
            gap += float((policy - reference)[valid].sum())
            kl_docs += int(valid.sum())
        return [desirable, undesirable, tokens, gap, kl_docs]

    def loss(self, runner: nn.Module, batch: Batch,
             totals: list[float]) -> tuple[torch.Tensor, dict[str, float]]:
        rows = max(totals[0] + totals[1], 1)
        valid = _valid_rows(batch)
        desirable = batch.desirable.to(valid.device)[valid]
        trained = _documents(batch, odd=False)
        with torch.no_grad(), kernels.training_forward():  # rounds as the policy's forward below does
            reference = self._reference_logps(trained)[valid]
        logps = self._logps(runner, trained, self.model)[valid]
        # kto_loss takes the KL documents' log-probs and averages their gap: the window's mean gap stands in as one
        z0 = torch.tensor([reference_point(totals)], dtype=logps.dtype, device=logps.device)
        out = kto_loss(self.settings, logps, reference, desirable, z0, torch.zeros_like(z0))
        loss = out.losses.sum() / rows
        rewards = self.settings.beta * (logps.detach() - reference)
        stats = {"loss": loss.item()}
        for name, mask in (("chosen", desirable), ("rejected", ~desirable)):
            stats[f"rewards/{name}"] = rewards[mask].sum().item()
            stats[f"logps/{name}"] = logps.detach()[mask].sum().item()
        return loss, stats

    def summary(self, sums: dict[str, float], totals: list[float]) -> dict[str, float]:
        desirable, undesirable = int(totals[0]), int(totals[1])
        out = {"loss": sums["loss"], "tokens": int(totals[2]), "kl": reference_point(totals)}
        for name, n in (("chosen", desirable), ("rejected", undesirable)):
            if n:
                out |= {f"rewards/{name}": sums[f"rewards/{name}"] / n, f"logps/{name}": sums[f"logps/{name}"] / n}
        if desirable and undesirable:
            out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
        return out

    def _logps(self, runner: nn.Module, docs: "_Documents", model: nn.Module | None = None) -> torch.Tensor:
        """Summed answer log-probs of each document, run through `runner` (DDP's wrapper or the model itself) with
        `model`'s head (default: runner's)."""
        hidden = runner(docs.input_ids, docs.positions, AttnMeta.for_training(docs.cu_seqlens))
        return sequence_logps(runner if model is None else model, hidden, docs.labels, docs.cu_seqlens)[0]

    def _reference_logps(self, docs: "_Documents") -> torch.Tensor:
        if self.reference is not None:
            return self._logps(self.reference, docs)
        with lora_disabled(self.model):
            return self._logps(self.model, docs)


@dataclass(frozen=True, slots=True)
class _Documents:
    """Every other document of a batch, laid end to end as a flat batch of their own."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    cu_seqlens: torch.Tensor
    labels: torch.Tensor


def _documents(batch: Batch, odd: bool) -> _Documents:
    """The rows' trained documents (odd=False) or their KL documents (odd=True)."""
    lengths = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).long()
    keep = torch.zeros(len(lengths), dtype=torch.bool, device=lengths.device)
    keep[int(odd)::2] = True
    tokens = torch.repeat_interleave(keep, lengths).to(batch.input_ids.device)
    cu = torch.zeros(int(keep.sum()) + 1, dtype=batch.cu_seqlens.dtype, device=batch.cu_seqlens.device)
    cu[1:] = lengths[keep].cumsum(0)
    return _Documents(batch.input_ids[tokens], batch.positions[tokens], cu, batch.labels[tokens])


def _valid_rows(batch: Batch) -> torch.Tensor:
    """Rows whose two documents both have trained tokens (a validation filler row has none: it weighs nothing)."""
    counts = trained_per_document(batch)
    return (counts[0::2] > 0) & (counts[1::2] > 0)


def reference_point(totals: list[float]) -> float:
    """z0 of the window whose totals (summed over ranks) these are: the mean KL gap, clamped at 0."""
    return max(totals[3] / max(totals[4], 1), 0.0)

