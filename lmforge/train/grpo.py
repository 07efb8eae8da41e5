"""Online-RL policy losses (GRPO and its variants) and group advantages, on flat per-token tensors. Pure functions:
the recipe (rollouts, rewards, schedule) lives in train/recipes/grpo.py.

A rollout batch holds G completions per prompt. Per completion token t of sequence s the loss is TRL 1.16's
(`GRPOTrainer._compute_loss`; tests/parity/test_grpo_trl.py calls it):
    r_t = exp(logp_t - old_t)                              importance ratio to the policy that sampled the batch
    l_t = -min(r_t A_s, clip(r_t, 1 - eps, 1 + eps_high) A_s) * w_t + beta * k3_t * (r_t if kl_bias_correction)
where A_s is the sequence's advantage, w_t the sampler correction (below) and k3_t = exp(ref_t - logp_t) -
(ref_t - logp_t) - 1, Schulman's k3 estimator of KL(policy || reference). `delta` caps r_t in the first term
(two-sided clipping, TRL's delta). Sources:
- `grpo`: Shao et al. 2024 (DeepSeekMath, arXiv 2402.03300) eq. 3: each sequence's token mean, averaged over sequences.
- `dr_grpo`: Liu et al. 2025 (Dr. GRPO, arXiv 2503.20783): the token sum over sequences x max_completion_length.
- `dapo`: Yu et al. 2025 (DAPO, arXiv 2503.14476) eq. 8: the token sum over the rollout batch's tokens; TRL divides
  by the rollout batch's tokens per optimizer step, so every step of one rollout batch has the same denominator.
- `bnpo`: the token sum over the optimizer step's own tokens (TRL divides each micro-batch by its own tokens and the
  accumulation steps, which is the same when an optimizer step is one micro-batch).
- advantages `group`: (r - group mean) / (group std + 1e-4) (GRPO; TRL's scale_rewards "group", "batch" or "none");
  `rloo`: r - the mean of the other G - 1 rewards of the group (Ahmadian et al. 2024, arXiv 2402.14740), TRL's
  RLOOTrainer baseline, scaled the same way when scale_rewards is not "none".
- Sampler correction w_t (TRL's vllm_importance_sampling_mode / clip_min / clip_max): the ratio of the trainer's to
  the sampler's probability of each sampled token, exp(old_t - sampled_t), per token or per sequence (the sum of
  its tokens' log-ratios), truncated (clamped into [min, max]) or masked (0 outside). Truncated importance sampling
  is Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL training".

Every reduction here is a sum: the caller divides by the whole optimizer step's totals (`Denominators`, summed over
micro-batches and ranks), so a step equals one large batch however it is split.
"""

import math
from dataclasses import dataclass
from typing import Literal

import torch

LossType = Literal["grpo", "dr_grpo", "dapo", "bnpo"]
Correction = Literal["token_truncate", "token_mask", "sequence_truncate", "sequence_mask", "none"]
STD_EPS = 1e-4  # TRL's: a group whose rewards are all equal gets advantage 0, not a division by zero
# Log-probs under the processed (top-k / top-p / min-p) distribution are floored at -1e4 for a token outside it
# (train/preference.py LOGP_FLOOR): below DROPPED a token was dropped by that policy's cut-offs.
DROPPED = -1e3


@dataclass(frozen=True, slots=True)
class GRPOSettings:
    """Hyper-parameters, named and defaulted as TRL 1.16's GRPOConfig names them (the sampler correction's fields
    drop TRL's `vllm_` prefix; lmforge's sampler is its own engine). TRL's default correction is sequence_mask;
    lmforge's is token_truncate, the truncated importance sampling of Yao et al."""

    loss_type: LossType = "dapo"
    beta: float = 0.0  # KL weight; 0 needs no reference log-probs
    epsilon: float = 0.2
    epsilon_high: float | None = None  # clip-higher (DAPO); None: epsilon
    delta: float | None = None  # upper cap of the unclipped ratio (two-sided clipping); None: none
    kl_bias_correction: bool = True  # TRL's use_bias_correction_kl: the KL term times the importance ratio
    importance_sampling_mode: Correction = "token_truncate"
    importance_sampling_clip_min: float | None = None
    importance_sampling_clip_max: float | None = 3.0
    max_completion_length: int = 256  # dr_grpo's constant denominator

    def __post_init__(self) -> None:
        checks = [("beta", self.beta >= 0, "must be >= 0"), ("epsilon", self.epsilon > 0, "must be positive"),
                  ("epsilon_high", self.epsilon_high is None or self.epsilon_high > 0, "must be positive"),
                  ("delta", self.delta is None or self.delta > 1 + self.high, "must exceed 1 + epsilon_high"),
                  ("max_completion_length", self.max_completion_length > 0, "must be positive")]
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f"{name} {why}, got {getattr(self, name)}")
        low, high = self.importance_sampling_clip_min, self.importance_sampling_clip_max
        if low is not None and high is not None and low >= high:
            raise ValueError(f"importance_sampling_clip_min ({low}) must be below importance_sampling_clip_max "
                             f"({high})")

    @property
    def high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


@dataclass(frozen=True, slots=True)
class Denominators:
    """One optimizer step's totals over all its micro-batches and ranks."""

    sequences: int
    tokens: int  # completion tokens trained in this step
    rollout_tokens_per_step: float  # the rollout batch's completion tokens / its optimizer steps (dapo)

    def of(self, settings: GRPOSettings) -> float:
        kind = settings.loss_type
        value = {"grpo": self.sequences, "dr_grpo": self.sequences * settings.max_completion_length,
                 "bnpo": self.tokens, "dapo": self.rollout_tokens_per_step}[kind]
        return max(float(value), 1.0)


@dataclass(frozen=True, slots=True)
class GRPOOutput:
    loss: torch.Tensor  # this micro-batch's share of the step's loss (sums / Denominators)
    sums: dict[str, torch.Tensor]  # detached token sums for metrics: kl, clipped_low/high/region, tokens


def group_advantages(rewards: torch.Tensor, group_size: int, baseline: Literal["group", "rloo"] = "group",
                     scale: Literal["group", "batch", "none"] = "group") -> torch.Tensor:
    """rewards [prompts * G] (NaN: unscorable, TRL's None) -> advantages [prompts * G], groups of G consecutive
    completions. Unscorable completions are left out of their group's statistics and get advantage 0."""
    if rewards.dim() != 1 or group_size < 1 or len(rewards) % group_size:
        raise ValueError(f"{len(rewards)} rewards do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size)
    scored = (~grouped.isnan()).sum(1, keepdim=True)
    if baseline == "group":
        base = grouped.nanmean(1, keepdim=True).expand_as(grouped)
    elif baseline == "rloo":
        # the mean of the scorable siblings; a completion alone in its group has no baseline and gets 0
        base = (grouped.nansum(1, keepdim=True) - grouped) / (scored - 1)
    else:
        raise ValueError(f"unknown advantage baseline {baseline!r}: group or rloo")
    advantages = grouped - base
    if scale == "group":
        advantages = advantages / (_nanstd(grouped, 1).expand_as(grouped) + STD_EPS)
    elif scale == "batch":
        advantages = advantages / (_nanstd(rewards, 0) + STD_EPS)
    elif scale != "none":
        raise ValueError(f"unknown scale_rewards {scale!r}: group, batch or none")
    return advantages.reshape(-1).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def _nanstd(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The unbiased std of the non-NaN entries (TRL's nanstd); NaN where fewer than two."""
    count = (~x.isnan()).sum(dim, keepdim=True)
    mean = x.nanmean(dim, keepdim=True)
    return ((x - mean) ** 2).nanmean(dim, keepdim=True).mul(count / (count - 1)).sqrt()


def sampler_correction(settings: GRPOSettings, old_logps: torch.Tensor, sampled_logps: torch.Tensor,
                       seq_index: torch.Tensor, num_sequences: int) -> torch.Tensor | None:
    """Per-token weights [N] correcting for the sampler's distribution differing from the trainer's (None: mode
    "none"). old_logps: the trainer's log-probs of the sampled tokens under the weights that sampled them;
    sampled_logps: the sampler's own."""
    mode = settings.importance_sampling_mode
    if mode == "none":
        return None
    diff = (old_logps - sampled_logps).detach().nan_to_num(nan=0.0)
    if mode.startswith("sequence"):
        diff = diff.new_zeros(num_sequences).index_add_(0, seq_index, diff).index_select(0, seq_index)
    ratio = diff.exp()
    low, high = settings.importance_sampling_clip_min, settings.importance_sampling_clip_max
    if mode.endswith("truncate"):
        return ratio.clamp(min=low, max=high)
    outside = (ratio < (-math.inf if low is None else low)) | (ratio > (math.inf if high is None else high))
    return ratio.masked_fill(outside, 0.0)


def grpo_loss(settings: GRPOSettings, logps: torch.Tensor, seq_index: torch.Tensor, seq_tokens: torch.Tensor,
              advantages: torch.Tensor, denominators: Denominators, old_logps: torch.Tensor | None = None,
              ref_logps: torch.Tensor | None = None, correction: torch.Tensor | None = None) -> GRPOOutput:
    """One micro-batch. logps [N]: the policy's log-probs of the completion tokens (with gradient), flat over the
    micro-batch's sequences; seq_index [N]: each token's sequence in 0..S-1; seq_tokens [S]: each sequence's
    completion tokens; advantages [S]. old_logps [N]: the log-probs when the batch was sampled (None: on-policy,
    logps detached); ref_logps [N]: the reference's (required when beta > 0); correction [N]: sampler_correction."""
    old = logps.detach() if old_logps is None else old_logps.detach()
    # A token outside the current, old or reference policy's kept set weighs nothing (PPO's clip would give it no
    # gradient either); its log-probs are replaced by finite stand-ins first, so that no inf reaches backward.
    kept = (logps.detach() > DROPPED) & (old > DROPPED)
    if ref_logps is not None:
        kept &= ref_logps > DROPPED
    if not kept.all():
        logps = torch.where(kept, logps, logps.detach().clamp(min=DROPPED))
        old = torch.where(kept, old, logps.detach())
        ref_logps = None if ref_logps is None else torch.where(kept, ref_logps, logps.detach())
    ratio = (logps - old).exp()
    clipped = ratio.clamp(1 - settings.epsilon, 1 + settings.high)
    capped = ratio if settings.delta is None else ratio.clamp(max=settings.delta)
    adv = advantages.detach().to(logps.dtype).index_select(0, seq_index)
    token_losses = -torch.minimum(capped * adv, clipped * adv)
    if correction is not None:
        token_losses = token_losses * correction
    sums = {"tokens": logps.new_tensor(float(len(logps))), "dropped": (~kept).sum().float()}
    if settings.beta:
        if ref_logps is None:
            raise ValueError("beta > 0 needs the reference policy's log-probs")
        gap = ref_logps.detach() - logps
        kl = gap.exp() - gap - 1
        if settings.kl_bias_correction:
            kl = kl * ratio
        token_losses = token_losses + settings.beta * kl
        sums["kl"] = (kl.detach() * kept).sum()
    if settings.loss_type == "grpo":  # each sequence's token mean
        token_losses = token_losses / seq_tokens.to(logps.dtype).clamp(min=1).index_select(0, seq_index)
    # summed in float64: the terms (+-advantage x ratio) cancel, and a float32 sum's rounding would depend on how a
    # step is cut into micro-batches
    loss = ((token_losses * kept).sum(dtype=torch.float64) / denominators.of(settings)).float()
    with torch.no_grad():
        low = (ratio < 1 - settings.epsilon) & (adv < 0) & kept
        high = (ratio > 1 + settings.high) & (adv > 0) & kept
        sums.update(clipped_low=low.sum().float(), clipped_high=high.sum().float(),
                    clipped_region=(low | high).sum().float())
    return GRPOOutput(loss, sums)
