"""lmforge's GRPO-family losses (train/grpo.py) against TRL 1.16's own GRPOTrainer._compute_loss (a test-only
reference), and its advantages against the GRPO and RLOO formulas.

TRL's loss method is called unbound on a stand-in trainer that carries the attributes it reads; its model call
(`_get_per_token_logps_and_entropies`) returns a leaf tensor of per-token log-probs in TRL's right-padded
[sequences, completion width] layout. lmforge gets the same numbers flat (completion tokens end to end), and the
losses, the gradients with respect to every log-prob and the logged metrics must agree.
"""

import types
from collections import defaultdict

import pytest
import torch
from trl import GRPOTrainer  # pinned in the test extra: a missing reference fails, never skips

from lmforge.train.grpo import Denominators, GRPOSettings, group_advantages, grpo_loss, sampler_correction

TOL = 1e-5
LENGTHS = [5, 3, 8, 1, 6, 4]  # completion tokens per sequence: two prompts x G = 3
MAX_COMPLETION = 10


class Accelerator:
    num_processes = 1
    device = torch.device("cpu")
    gather = gather_for_metrics = staticmethod(lambda x: x.reshape(-1))
    reduce = staticmethod(lambda x, reduction="sum": x)


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    width = max(LENGTHS)
    mask = torch.zeros(len(LENGTHS), width)
    for i, n in enumerate(LENGTHS):
        mask[i, :n] = 1
    logps = -torch.rand(len(LENGTHS), width, generator=g) * 3  # the policy's
    old = logps + torch.randn(logps.shape, generator=g) * 0.3  # far enough for both clips to bite
    ref = logps + torch.randn(logps.shape, generator=g) * 0.5
    sampled = old + torch.randn(logps.shape, generator=g) * 0.4  # the sampler's view of the old policy
    advantages = torch.randn(len(LENGTHS), generator=g)
    return mask, logps * mask, old * mask, ref * mask, sampled * mask, advantages


def flat(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return x[mask.bool()]


def trl_loss(settings: GRPOSettings, leaf, mask, old, ref, advantages, is_ratio):
    correction = is_ratio is not None
    args = types.SimpleNamespace(use_bias_correction_kl=settings.kl_bias_correction, delta=settings.delta,
                                 steps_per_generation=1)
    standin = types.SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (leaf, torch.zeros_like(leaf), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
        beta=settings.beta, args=args, loss_type=settings.loss_type, epsilon_low=settings.epsilon,
        epsilon_high=settings.high, use_vllm=correction, vllm_importance_sampling_correction=correction,
        model=types.SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
        max_completion_length=settings.max_completion_length, accelerator=Accelerator(),
        _metrics=defaultdict(lambda: defaultdict(list)), _entropy_bonus_enabled=False, aux_loss_enabled=False)
    n = mask.shape[1]
    inputs = {"prompt_ids": torch.zeros(len(mask), 2, dtype=torch.long), "prompt_mask": torch.ones(len(mask), 2),
              "completion_ids": torch.zeros(len(mask), n, dtype=torch.long), "completion_mask": mask,
              "advantages": advantages, "old_per_token_logps": old, "num_items_in_batch": mask.sum()}
    if settings.beta:
        inputs["ref_per_token_logps"] = ref
    if correction:
        inputs["importance_sampling_ratio"] = is_ratio
    loss = GRPOTrainer._compute_loss(standin, None, inputs)
    return loss, {k: v[-1] for k, v in standin._metrics["train"].items()}


SETTINGS = [
    GRPOSettings("grpo", importance_sampling_mode="none"),
    GRPOSettings("grpo", beta=0.04, epsilon_high=0.28),
    GRPOSettings("dr_grpo", beta=0.1, max_completion_length=MAX_COMPLETION),
    GRPOSettings("dr_grpo", epsilon=0.1, delta=1.5, importance_sampling_mode="sequence_mask",
                 max_completion_length=MAX_COMPLETION),
    GRPOSettings("dapo", epsilon_high=0.28, importance_sampling_mode="none"),
    GRPOSettings("dapo", beta=0.04, kl_bias_correction=False, importance_sampling_mode="token_mask",
                 importance_sampling_clip_min=0.5, importance_sampling_clip_max=2.0),
    GRPOSettings("bnpo", beta=0.02, importance_sampling_mode="sequence_truncate", importance_sampling_clip_max=1.5),
    GRPOSettings("bnpo", delta=2.0, importance_sampling_mode="none"),
]


def short(s: GRPOSettings) -> str:
    return (f"{s.loss_type}-beta{s.beta}-eps{s.epsilon}-{s.high}-delta{s.delta}-"
            f"{s.importance_sampling_mode}-bias{int(s.kl_bias_correction)}")


@pytest.mark.parametrize("settings", SETTINGS, ids=short)
def test_each_loss_matches_trl_loss_gradients_and_metrics(batch, settings):
    mask, logps, old, ref, sampled, advantages = batch
    seq_index = torch.repeat_interleave(torch.arange(len(LENGTHS)), torch.tensor(LENGTHS))
    correction = sampler_correction(settings, flat(old, mask), flat(sampled, mask), seq_index, len(LENGTHS))
    padded_correction = None
    if correction is not None:
        padded_correction = torch.zeros_like(mask)
        padded_correction[mask.bool()] = correction
        if settings.importance_sampling_mode.startswith("sequence"):  # TRL keeps one column per sequence
            padded_correction = padded_correction[:, :1]

    leaf = logps.clone().requires_grad_()
    theirs, metrics = trl_loss(settings, leaf, mask, old, ref, advantages, padded_correction)
    (theirs_grad,) = torch.autograd.grad(theirs, leaf)

    leaf = logps.clone().requires_grad_()
    step = Denominators(len(LENGTHS), sum(LENGTHS), rollout_tokens_per_step=sum(LENGTHS))
    out = grpo_loss(settings, flat(leaf, mask), seq_index, torch.tensor(LENGTHS), advantages, step,
                    old_logps=flat(old, mask), ref_logps=flat(ref, mask), correction=correction)
    (ours_grad,) = torch.autograd.grad(out.loss, leaf)
    assert out.loss.item() == pytest.approx(theirs.item(), abs=TOL)
    assert (ours_grad - theirs_grad).abs().max() < TOL and ours_grad.abs().max() > 0
    tokens = out.sums["tokens"]
    for name in ("low", "high", "region"):
        assert (out.sums[f"clipped_{name}"] / tokens).item() == pytest.approx(metrics[f"clip_ratio/{name}_mean"],
                                                                              abs=TOL)
    assert out.sums["clipped_region"] > 0  # the old log-probs are far enough that clipping is exercised
    if settings.beta:
        assert (out.sums["kl"] / tokens).item() == pytest.approx(metrics["kl"], abs=TOL)


@pytest.mark.parametrize("settings", SETTINGS[:2] + SETTINGS[3:], ids=short)
def test_a_step_split_into_micro_batches_equals_one_batch(batch, settings):
    """The split of an optimizer step over micro-batches (or ranks) does not change its loss or gradients."""
    mask, logps, old, ref, sampled, advantages = batch
    lengths = torch.tensor(LENGTHS)
    step = Denominators(len(LENGTHS), sum(LENGTHS), rollout_tokens_per_step=sum(LENGTHS) / 2)

    def run(parts):
        leaf = logps.clone().requires_grad_()
        total = 0.0
        for part in parts:
            rows = torch.tensor(part)
            m = mask[rows]
            seq_index = torch.repeat_interleave(torch.arange(len(part)), lengths[rows])
            corr = sampler_correction(settings, flat(old[rows], m), flat(sampled[rows], m), seq_index, len(part))
            out = grpo_loss(settings, flat(leaf[rows], m), seq_index, lengths[rows], advantages[rows], step,
                            old_logps=flat(old[rows], m), ref_logps=flat(ref[rows], m), correction=corr)
            total = total + out.loss
        return total, torch.autograd.grad(total, leaf)[0]

    whole, whole_grad = run([[0, 1, 2, 3, 4, 5]])
    split, split_grad = run([[0, 4], [5], [1, 3, 2]])
    assert split.item() == pytest.approx(whole.item(), abs=1e-6)
    assert (split_grad - whole_grad).abs().max() < 1e-6


def test_group_and_rloo_advantages_follow_their_formulas():
    rewards = torch.tensor([1.0, 0.0, 0.5, 2.0, 2.0, 2.0, 0.0, 3.0, float("nan")])
    g = 3
    grouped = rewards.view(-1, g)

    expected = []
    for row in grouped.tolist():
        scored = [r for r in row if r == r]
        mean = sum(scored) / len(scored)
        std = (sum((r - mean) ** 2 for r in scored) / (len(scored) - 1)) ** 0.5
        expected += [(r - mean) / (std + 1e-4) if r == r else 0.0 for r in row]
    assert group_advantages(rewards, g).tolist() == pytest.approx(expected, abs=1e-6)
    assert group_advantages(rewards, g)[3:6].abs().max() == 0  # equal rewards: no signal

    loo = []
    for row in grouped.tolist():
        scored = [r for r in row if r == r]
        loo += [r - (sum(scored) - r) / (len(scored) - 1) if r == r else 0.0 for r in row]
    assert group_advantages(rewards, g, baseline="rloo", scale="none").tolist() == pytest.approx(loo, abs=1e-6)

    batch_std = torch.tensor([r for r in rewards.tolist() if r == r]).std()
    unscaled = group_advantages(rewards, g, scale="none")
    assert group_advantages(rewards, g, scale="batch").tolist() == pytest.approx(
        (unscaled / (batch_std + 1e-4)).tolist(), abs=1e-6)
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(rewards, 4)


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
def test_sampler_correction_modes(mode):
    old = torch.tensor([-1.0, -2.0, -0.5, -3.0, -1.5])
    sampled = torch.tensor([-1.5, -1.0, -0.5, -4.5, -1.4])
    seq_index = torch.tensor([0, 0, 1, 1, 1])
    settings = GRPOSettings(importance_sampling_mode=mode, importance_sampling_clip_min=0.5,
                            importance_sampling_clip_max=2.0)
    token = (old - sampled).exp()
    seq = torch.stack([token[:2].prod(), token[2:].prod()])[seq_index]
    ratio = seq if mode.startswith("sequence") else token
    if mode.endswith("truncate"):
        want = ratio.clamp(0.5, 2.0)
    else:
        want = torch.where((ratio < 0.5) | (ratio > 2.0), torch.zeros_like(ratio), ratio)
    got = sampler_correction(settings, old, sampled, seq_index, 2)
    assert got.tolist() == pytest.approx(want.tolist(), rel=1e-6)
    assert sampler_correction(GRPOSettings(importance_sampling_mode="none"), old, sampled, seq_index, 2) is None


def test_settings_refuse_what_they_cannot_mean():
    with pytest.raises(ValueError, match="delta"):
        GRPOSettings(delta=1.1)
    with pytest.raises(ValueError, match="clip_min"):
        GRPOSettings(importance_sampling_clip_min=3.0, importance_sampling_clip_max=2.0)
    with pytest.raises(ValueError, match="beta > 0"):
        x = torch.zeros(3, requires_grad=True)
        grpo_loss(GRPOSettings(beta=0.1), x, torch.zeros(3, dtype=torch.long), torch.tensor([3]), torch.ones(1),
                  Denominators(1, 3, 3.0))
