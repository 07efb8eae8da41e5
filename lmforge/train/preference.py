"""Preference-optimisation losses on per-sequence log-probabilities, and those log-probabilities from one flat
packed batch. Pure functions: the recipe (data, reference model, schedule) lives elsewhere.

Where each formula comes from (TRL 1.16 names; tests/parity/test_preference_trl.py checks each against TRL's code):
- `sigmoid`: DPO, Rafailov et al. 2023 (arXiv 2305.18290) eq. 7; TRL DPOTrainer loss_type "sigmoid".
- `ipo`: Azar et al. 2023 (arXiv 2310.12036) eq. 17, on log-ratios averaged over the answer's tokens as TRL does
  (its DPOTrainer loss_type "ipo"; the length normalisation was confirmed with the IPO authors, says TRL).
- `hinge`: SLiC, Zhao et al. 2023 (arXiv 2305.10425); TRL loss_type "hinge".
- `robust`: rDPO, Chowdhury et al. 2024 (arXiv 2403.00409) eq. 8, noise rate `label_smoothing`; TRL "robust".
- `rpo_alpha`: RPO, Pang et al. 2024 (arXiv 2404.19733): NLL of the chosen answers, a mean over their tokens,
  added with weight rpo_alpha (TRL 1.16: loss_type ["sigmoid", "sft"] with loss_weights [1, rpo_alpha]).
- `simpo`: Meng et al. 2024 (arXiv 2405.14734) eq. 6, reference-free on length-averaged log-probs with margin
  `simpo_gamma`; TRL CPOTrainer loss_type "simpo" (with its label smoothing; rpo_alpha is CPO's cpo_alpha).
- `orpo`: Hong et al. 2024 (arXiv 2403.07691) eq. 6-7: the chosen answers' NLL minus beta * log sigmoid(log odds
  ratio) on length-averaged log-probs; TRL ORPOTrainer.odds_ratio_loss. Unlike TRL, whose NLL also covers the
  prompt tokens, the NLL here is the chosen answer's alone, as in the paper.
- `kto`: Ethayarajh et al. 2024 (arXiv 2402.01306) eq. 7-8 with the batch's KL reference point (policy vs reference
  log-probs of mismatched prompt/completion rows, clamped at 0, no gradient); TRL KTOTrainer loss_type "kto" with
  desirable_weight / undesirable_weight.
"""

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmforge import kernels
from lmforge.data.dataset import IGNORE_INDEX
from lmforge.engine.sampling_params import SamplingParams
from lmforge.engine.truncation import processed_log_probs
from lmforge.train.loss import CHUNK_ROWS, linear_log_probs, row_entropy

PairedLoss = Literal["sigmoid", "ipo", "hinge", "robust", "simpo", "orpo"]
REFERENCE_FREE = ("simpo", "orpo")  # they need no reference log-probs and use length-averaged log-probs
LOGP_FLOOR = -1e4  # a sampled token the trainer's cut-offs drop (logits a hair apart): ratio exp(floor - old) = 0


@dataclass(frozen=True, slots=True)
class PreferenceSettings:
    """Hyper-parameters, named as TRL names them (defaults are TRL's)."""

    loss_type: PairedLoss | Literal["kto"] = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0  # robust: assumed label-noise rate in [0, 0.5); simpo: conservative smoothing
    rpo_alpha: float = 0.0  # weight of the chosen answers' NLL (sigmoid, ipo, hinge, robust, simpo)
    simpo_gamma: float = 0.5
    desirable_weight: float = 1.0  # kto
    undesirable_weight: float = 1.0  # kto

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ValueError(f"beta must be positive, got {self.beta}")
        if self.label_smoothing and self.loss_type not in ("robust", "simpo"):
            raise ValueError(f"label_smoothing applies to the robust and simpo losses only, not {self.loss_type}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must lie in [0, 0.5), got {self.label_smoothing}")
        if self.rpo_alpha and self.loss_type in ("orpo", "kto"):
            raise ValueError(f"rpo_alpha does not apply to the {self.loss_type} loss")

    @property
    def nll_weight(self) -> float:
        """Weight of the chosen answers' NLL (a mean over their tokens) added to the preference term."""
        return 1.0 if self.loss_type == "orpo" else self.rpo_alpha


@dataclass(frozen=True, slots=True)
class PreferenceOutput:
    loss: torch.Tensor  # scalar to minimise: the mean of `losses` plus any NLL term (TRL's batch loss)
    losses: torch.Tensor  # per pair (per row for kto): the preference term alone
    metrics: dict[str, torch.Tensor]  # detached scalars: rewards/chosen, rewards/rejected, ... as TRL logs them


def sequence_logps(model: nn.Module, hidden: torch.Tensor, labels: torch.Tensor,
                   cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per document of a flat packed batch: the summed log-probs of its trained tokens and their count.

    hidden [T, H] is the model's output on the batch, labels [T] the token to predict at each position or -100
    (prompt tokens, the last token of each document), cu_seqlens [docs + 1] the documents' offsets. A preference
    batch holds each pair as two documents, prompt+chosen then prompt+rejected: logps[0::2] are the chosen answers.
    The vocabulary projection runs in chunks of rows, so no [T, vocab] logits exist at once: fused with the
    log-softmax where the head is frozen (train/loss.py linear_log_probs), else recomputed in backward (activation
    checkpointing)."""
    if int(cu_seqlens[-1]) != len(hidden) or len(labels) != len(hidden):
        raise ValueError(f"cu_seqlens covers {int(cu_seqlens[-1])} tokens and labels {len(labels)}, but the batch "
                         f"has {len(hidden)}")
    lens = cu_seqlens[1:] - cu_seqlens[:-1]
    doc = torch.repeat_interleave(torch.arange(len(lens), device=hidden.device), lens.to(hidden.device).long())
    doc = doc[labels != IGNORE_INDEX]
    logps = token_logps(model, hidden, labels)
    sums = logps.new_zeros(len(lens)).index_add(0, doc, logps)
    counts = torch.zeros(len(lens), dtype=torch.long, device=hidden.device).index_add_(0, doc, torch.ones_like(doc))
    return sums, counts


def token_logps(model: nn.Module, hidden: torch.Tensor, labels: torch.Tensor,
                sampling: SamplingParams | None = None, entropies: torch.Tensor | None = None) -> torch.Tensor:
    """log p(label) at each row whose label is not -100, in row order: under the model's distribution, or under the
    one an engine samples from with `sampling`'s temperature, top-k, top-p and min-p (engine/truncation.py
    processed_log_probs; a token outside the kept set gets LOGP_FLOOR instead of -inf, so it weighs nothing and
    keeps the loss finite). Fused with the head where it is a plain linear layer and the distribution is the
    model's, else chunk by chunk (checkpointed). In bitwise mode (kernels.bitwise) always as an engine computes
    them: the head's logits, then the sampled distribution's log_softmax. `entropies` (float32, one per returned
    row), when given, receives each row's entropy of the tempered distribution (loss.row_entropy, TRL's metric)
    from the same logits."""
    rows = (labels != IGNORE_INDEX).nonzero().squeeze(1)
    hidden, labels = hidden.index_select(0, rows), labels.index_select(0, rows)
    plain = sampling is None or (sampling.temperature == 1 and sampling.top_k in (0, -1) and sampling.top_p == 1
                                 and not sampling.min_p)
    if plain and sampling is not None and kernels.in_bitwise():
        plain = False
    logps = linear_log_probs(hidden, model.lm_head, labels, entropies) if plain else None
    if logps is None:
        chunks = [_chunk_logps(model, hidden[start:start + CHUNK_ROWS], labels[start:start + CHUNK_ROWS],
                               None if plain else sampling,
                               None if entropies is None else entropies[start:start + CHUNK_ROWS])
                  for start in range(0, len(labels), CHUNK_ROWS)]
        logps = torch.cat(chunks) if chunks else hidden.new_zeros(0, dtype=torch.float32)
    return logps


def _chunk_logps(model: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, sampling: SamplingParams | None,
                 entropies: torch.Tensor | None) -> torch.Tensor:
    box = [] if entropies is not None else None  # not a tensor: checkpoint would refuse one changed in place
    if not torch.is_grad_enabled():
        logps = _label_logps(model, hidden, labels, sampling, box)
    else:
        logps = checkpoint(_label_logps, model, hidden, labels, sampling, box, use_reentrant=False)
    if entropies is not None:
        entropies.copy_(box[0])
    return logps


def _label_logps(model: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, sampling: SamplingParams | None,
                 box: list | None) -> torch.Tensor:
    logits = model.logits(hidden)  # float32
    if box is not None and not box:  # (not again when backward recomputes this chunk)
        box.append(row_entropy(logits, sampling.temperature if sampling is not None else 1.0))
    if sampling is not None:
        return processed_log_probs(logits, labels, sampling.temperature, sampling.top_k, sampling.top_p,
                                   sampling.min_p).clamp(min=LOGP_FLOOR)
    return logits.gather(1, labels[:, None]).squeeze(1) - logits.logsumexp(dim=1)


def preference_loss(settings: PreferenceSettings, chosen_logps: torch.Tensor, rejected_logps: torch.Tensor,
                    chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor,
                    ref_chosen_logps: torch.Tensor | None = None,
                    ref_rejected_logps: torch.Tensor | None = None) -> PreferenceOutput:
    """Paired losses. *_logps [pairs] are summed answer log-probs (sequence_logps), *_tokens their token counts;
    the reference log-probs are required except for simpo and orpo."""
    kind, beta = settings.loss_type, settings.beta
    if kind == "kto":
        raise ValueError("the kto loss takes unpaired rows: call kto_loss")
    if kind in REFERENCE_FREE:
        chosen = chosen_logps / chosen_tokens.clamp(min=1)
        rejected = rejected_logps / rejected_tokens.clamp(min=1)
        chosen_rewards, rejected_rewards = beta * chosen.detach(), beta * rejected.detach()
        logged_chosen, logged_rejected = chosen, rejected
    else:
        if ref_chosen_logps is None or ref_rejected_logps is None:
            raise ValueError(f"the {kind} loss needs the reference model's log-probs")
        chosen, rejected = chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps
        chosen_rewards, rejected_rewards = beta * chosen.detach(), beta * rejected.detach()
        logged_chosen, logged_rejected = chosen_logps, rejected_logps
    delta = chosen - rejected
    smoothing = settings.label_smoothing
    if kind == "sigmoid":
        losses = -F.logsigmoid(beta * delta)
    elif kind == "ipo":
        delta = chosen / chosen_tokens.clamp(min=1) - rejected / rejected_tokens.clamp(min=1)
        losses = (delta - 1 / (2 * beta)) ** 2
    elif kind == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif kind == "robust":
        losses = (-(1 - smoothing) * F.logsigmoid(beta * delta) + smoothing * F.logsigmoid(-beta * delta)) / (
            1 - 2 * smoothing)
    elif kind == "simpo":
        margin = beta * delta - settings.simpo_gamma
        losses = -(1 - smoothing) * F.logsigmoid(margin) - smoothing * F.logsigmoid(-margin)
    elif kind == "orpo":
        log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
        losses = -beta * F.logsigmoid(log_odds)
    else:
        raise ValueError(f"unknown preference loss {kind!r}")
    loss = losses.mean()
    nll_weight = settings.nll_weight
    if nll_weight:  # a mean over all chosen answer tokens of the batch, as TRL's sft / cpo_alpha / ORPO NLL
        loss = loss + nll_weight * -(chosen_logps.sum() / chosen_tokens.sum().clamp(min=1))
    metrics = {
        "rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "logps/chosen": logged_chosen.detach().mean(), "logps/rejected": logged_rejected.detach().mean(),
    }
    return PreferenceOutput(loss, losses, metrics)


def kto_loss(settings: PreferenceSettings, logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor,
             kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> PreferenceOutput:
    """KTO on unpaired rows. logps / ref_logps [rows] are summed completion log-probs, desirable [rows] bool;
    kl_logps / ref_kl_logps those of the batch's mismatched (prompt, other row's completion) pairs, whose mean
    difference is the reference point z0. Under data parallelism z0 is the mean over all ranks (TRL gathers it):
    pass the gathered KL log-probs."""
    if settings.loss_type != "kto":
        raise ValueError(f"kto_loss computes the kto loss, not {settings.loss_type}")
    beta = settings.beta
    kl = (kl_logps - ref_kl_logps).mean().detach().clamp(min=0)
    logratios = logps - ref_logps
    desirable = desirable.bool()
    losses = torch.where(desirable, settings.desirable_weight * (1 - torch.sigmoid(beta * (logratios - kl))),
                         settings.undesirable_weight * (1 - torch.sigmoid(beta * (kl - logratios))))
    rewards = beta * logratios.detach()
    chosen_rewards, rejected_rewards = rewards[desirable], rewards[~desirable]
    metrics = {"kl": kl}
    if len(chosen_rewards):
        metrics |= {"rewards/chosen": chosen_rewards.mean(), "logps/chosen": logps.detach()[desirable].mean()}
    if len(rejected_rewards):
        metrics |= {"rewards/rejected": rejected_rewards.mean(), "logps/rejected": logps.detach()[~desirable].mean()}
    if len(chosen_rewards) and len(rejected_rewards):
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return PreferenceOutput(losses.mean(), losses, metrics)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0 without cancellation (Maechler 2012: switch formulas at -log 2)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))
