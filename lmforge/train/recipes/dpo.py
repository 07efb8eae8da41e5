"""Preference optimisation (`recipe: dpo`): DPO, IPO, SLiC hinge, robust DPO, SimPO and ORPO on prompt/chosen/rejected
pairs, in the same loop as SFT (recipes/sft.py: data shards, accumulation, DDP/FSDP, checkpoints, exact resume).

What differs is the objective. Each micro-batch holds whole pairs as two documents each, prompt+chosen then the
rejected answer attending to that prompt (computed once for both), in one flat packed batch (data/dataset.py
PairDataset). The summed answer log-probs of every
document (train/preference.py sequence_logps) feed the configured loss; the reference log-probs come from the
starting model under no_grad: the same weights with adapters switched off for LoRA / QLoRA (no second copy in
memory), a frozen copy of the starting weights for full fine-tuning. Reference-free losses (simpo, orpo) skip it.
With `preference.precompute_ref_log_probs` (TRL's name; the default for full fine-tuning) the frozen copy runs once
over every training and validation pair before the first step (`prepare`) and is freed: the run then looks each
pair's reference log-probs up by its tokens, and its peak memory holds no second model.

A window's loss is what one big batch of its pairs would give, however they are split into micro-batches and
ranks: the per-pair terms are summed and divided by the window's pairs on all ranks, the NLL term (rpo_alpha, orpo)
by the window's chosen-answer tokens. Metrics are TRL's (rewards/chosen, rewards/rejected, rewards/margins,
rewards/accuracies, logps/chosen, logps/rejected), means over the window's pairs; "tokens" counts the tokens of
both sequences of every pair, prompt+chosen and prompt+rejected (the prompt twice, though it runs once).
"""

import contextlib
import hashlib
import logging
import time

import numpy as np
import torch
from torch import nn

from lmforge.config import TrainConfig
from lmforge.data import IGNORE_INDEX, Batch, join_batches
from lmforge.data.loader import make_batch
from lmforge.layers.attention import AttnMeta
from lmforge.layers.linear import frozen_packs
from lmforge.layers.lora import lora_disabled
from lmforge.models import build_model
from lmforge.train import dist
from lmforge.train.allocator import release_free_memory
from lmforge.train.preference import REFERENCE_FREE, PreferenceSettings, preference_loss, sequence_logps

log = logging.getLogger("lmforge")
REFERENCE_GROUP = 4  # micro-batches joined per reference pass: longer products, a bounded no_grad peak
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected")


class PreferenceObjective:
    """The DPO-family loss of a micro-batch of pairs, normalised by the window's totals (see the module doc)."""

    def __init__(self, cfg: TrainConfig, model: nn.Module, model_dir, device: torch.device):
        from lmforge.train.recipes.sft import autocast  # sft builds this objective: imported here, not at the top

        p = cfg.preference
        self.settings = PreferenceSettings(p.loss, p.beta, p.label_smoothing, p.rpo_alpha, p.simpo_gamma)
        self.model = model
        self.reference: nn.Module | None = None  # None: the policy with adapters off, or no reference at all
        if p.loss not in REFERENCE_FREE and cfg.method == "full":
            dtype = torch.bfloat16 if cfg.precision == "bf16-mixed" else torch.float32
            self.reference = build_model(model_dir, dtype, device).eval().requires_grad_(False)
        self.precompute = p.loss not in REFERENCE_FREE and precomputes_reference(cfg)
        self.group_rows = cfg.micro_batch_size * REFERENCE_GROUP
        self.table: dict[bytes, torch.Tensor] | None = None  # pair key -> reference log-probs, once prepared
        self.autocast = lambda: autocast(cfg, device)  # totals() runs outside the loop's autocast
        # LoRA's frozen bf16 base and head on the packed CPU GEMM, in the policy's forward and the reference pass
        self.packs = None if cfg.method == "full" else frozen_packs(model)
        self._references: dict[int, torch.Tensor] = {}  # id(batch) -> its reference log-probs, from totals()

    def prepare(self, datasets, world: dist.World, device: torch.device) -> None:
        """Precomputes the reference log-probs of every training and validation pair (each rank runs every
        world.size-th group of rows, one all-reduce shares them), then frees the reference model."""
        if not self.precompute:
            return
        started, self.table = time.perf_counter(), {}
        # a frozen bf16 copy takes the packed GEMM (AVX512-BF16 without AMX), its packs freed with it
        packs = frozen_packs(self.reference) if self.reference is not None else None
        with packs.active() if packs is not None else contextlib.nullcontext():
            self._fill_table(datasets, world, device)
        freed = "; the reference model is freed" if self.reference is not None else ""
        self.reference = packs = None  # the frozen copy is no longer needed: its memory goes back before training
        release_free_memory()
        self.seconds = time.perf_counter() - started
        log.info("reference log-probs of %d pairs precomputed in %.1f s%s", len(self.table), self.seconds, freed)

    def _fill_table(self, datasets, world: dist.World, device: torch.device) -> None:
        for dataset in (datasets.train, datasets.validation):
            if dataset is None:
                continue
            groups = np.array_split(np.arange(dataset.num_rows), max(1, -(-dataset.num_rows // self.group_rows)))
            keys, values = [], []
            for i, rows in enumerate(groups):
                batch = make_batch(dataset, rows)
                keys += pair_keys(batch)
                if i % world.size == world.rank:
                    with self.autocast():
                        values.append(self._reference_logps(batch.to(device)).float())
                else:
                    values.append(torch.zeros(len(batch.cu_seqlens) - 1, device=device))
            logps = torch.cat(values)
            if world.distributed:
                torch.distributed.all_reduce(logps)
            self.table.update(zip(keys, logps.cpu().view(-1, 2), strict=True))

    def totals(self, window: list[Batch]) -> list[float]:
        """This rank's [pairs, chosen-answer tokens, policy tokens] of the window (the loop sums them over ranks).
        Also runs the reference over the window's micro-batches, REFERENCE_GROUP at a time: the reference does not
        change within a window, and longer products use the cores better (a few percent of a LoRA DPO step)."""
        self._references = {}
        if self.settings.loss_type not in REFERENCE_FREE and self.table is None:
            with self.autocast():
                for start in range(0, len(window), REFERENCE_GROUP):  # the same count of passes on every rank
                    group = window[start:start + REFERENCE_GROUP]
                    logps = self._reference_logps(join_batches(group))
                    for batch, part in zip(group, logps.split([len(b.cu_seqlens) - 1 for b in group]), strict=True):
                        self._references[id(batch)] = part
        pairs = chosen = tokens = 0
        for batch in window:
            counts = trained_per_document(batch)
            valid = (counts[0::2] > 0) & (counts[1::2] > 0)
            pairs += int(valid.sum())
            chosen += int(counts[0::2][valid].sum())
            tokens += pair_tokens(batch, valid)  # a validation filler pair counts nothing
        return [pairs, chosen, tokens]

    def loss(self, runner: nn.Module, batch: Batch, totals: list[float]) -> tuple[torch.Tensor, dict[str, float]]:
        pairs, chosen_tokens = max(totals[0], 1), max(totals[1], 1)
        meta = AttnMeta.for_training(batch.cu_seqlens, batch.prefix_lens)
        reference = None
        if self.settings.loss_type not in REFERENCE_FREE:  # from totals(), or run now for a batch it did not see
            reference = self._references.pop(id(batch), None)
            if reference is None:
                reference = self._reference_logps(batch) if self.table is None else self._look_up(batch)
        with self._packed():
            hidden = runner(batch.input_ids, batch.positions, meta)
            logps, counts = sequence_logps(self.model, hidden, batch.labels, batch.cu_seqlens)
        valid = (counts[0::2] > 0) & (counts[1::2] > 0)  # a validation filler pair trains nothing: it weighs nothing
        chosen, rejected = logps[0::2][valid], logps[1::2][valid]
        ref = (None, None) if reference is None else (reference[0::2][valid], reference[1::2][valid])
        out = preference_loss(self.settings, chosen, rejected, counts[0::2][valid], counts[1::2][valid], *ref)
        loss = out.losses.sum() / pairs
        if self.settings.nll_weight:
            loss = loss - self.settings.nll_weight * chosen.sum() / chosen_tokens
        n = len(chosen)
        stats = {"loss": loss.item(), **{name: out.metrics[name].item() * n if n else 0.0 for name in METRICS}}
        return loss, stats

    def summary(self, sums: dict[str, float], totals: list[float]) -> dict[str, float]:
        pairs = max(totals[0], 1)
        return {"loss": sums["loss"], "tokens": int(totals[2]), **{name: sums[name] / pairs for name in METRICS}}

    @torch.no_grad()
    def _reference_logps(self, batch: Batch) -> torch.Tensor:
        model = self.reference if self.reference is not None else self.model
        meta = AttnMeta.for_training(batch.cu_seqlens, batch.prefix_lens)
        with lora_disabled(self.model) if self.reference is None else contextlib.nullcontext(), self._packed():
            hidden = model(batch.input_ids, batch.positions, meta)
            return sequence_logps(model, hidden, batch.labels, batch.cu_seqlens)[0]

    def _look_up(self, batch: Batch) -> torch.Tensor:
        """The precomputed reference log-probs of the batch's pairs [documents]; 0 for a pair with nothing trained
        (a validation filler, which weighs nothing)."""
        out = []
        for key, counts in zip(pair_keys(batch), trained_per_document(batch).view(-1, 2), strict=True):
            found = self.table.get(key)
            if found is None and int(counts.min()) > 0:
                raise RuntimeError("a preference pair missing from the precomputed reference log-probs (the data "
                                   "changed after prepare())")
            out.append(found if found is not None else torch.zeros(2))
        return torch.cat(out).to(batch.labels.device)

    def _packed(self):
        if self.packs is not None and any(hasattr(p, "full_tensor") for p in self.model.parameters()):
            self.packs = None  # sharded by FSDP2 after this was built: each rank would pack every gathered weight
        return self.packs.active() if self.packs is not None else contextlib.nullcontext()


def precomputes_reference(cfg: TrainConfig) -> bool:
    """Whether a DPO-family run computes its reference log-probs before training (see the module doc)."""
    chosen = cfg.preference.precompute_ref_log_probs
    return cfg.method == "full" if chosen is None else chosen


def pair_keys(batch: Batch) -> list[bytes]:
    """A digest of each pair's tokens, labels and shared-prefix lengths: what its reference log-probs depend on."""
    cu = batch.cu_seqlens.tolist()
    ids, labels = batch.input_ids.cpu().numpy(), batch.labels.cpu().numpy()
    prefixes = np.zeros(len(cu) - 1, np.int64) if batch.prefix_lens is None else batch.prefix_lens.cpu().numpy()
    keys = []
    for i in range(0, len(cu) - 1, 2):
        digest = hashlib.blake2b(digest_size=16)
        for part in (ids[cu[i]:cu[i + 2]], labels[cu[i]:cu[i + 2]], np.diff(cu[i:i + 3]), prefixes[i:i + 2]):
            digest.update(np.ascontiguousarray(part, dtype=np.int64).tobytes())
        keys.append(digest.digest())
    return keys


def pair_tokens(batch: Batch, valid: torch.Tensor) -> int:
    """Tokens of the two sequences of each valid document pair [pairs] (a shared prompt counts for both)."""
    lengths = batch.sequence_lengths().to(valid.device)
    return int((lengths[0::2] + lengths[1::2])[valid].sum())


def trained_per_document(batch: Batch) -> torch.Tensor:
    trained = torch.zeros(batch.num_tokens + 1, dtype=torch.long, device=batch.labels.device)
    trained[1:] = (batch.labels != IGNORE_INDEX).long().cumsum(0)
    cu = batch.cu_seqlens.long().to(trained.device)
    return trained[cu[1:]] - trained[cu[:-1]]
