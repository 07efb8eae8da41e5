"""Knowledge-distillation losses: per trained token, a divergence between the teacher's and the student's
next-token distributions, plus the student's cross-entropy on the labels. Pure functions: the recipe (teacher
loading, data, schedule) lives elsewhere.

Where each formula comes from (tests/parity/test_distill_trl.py checks each against TRL 1.16's own
`GKDTrainer.generalized_jsd_loss`, trl/experimental/gkd/gkd_trainer.py):
- Both distributions are softmax(logits / temperature), teacher P and student Q (GKD, Agarwal et al. 2024,
  arXiv 2306.13649, section 2, and TRL). As in TRL the divergence is not multiplied by temperature**2 (Hinton et
  al. 2015 do that to keep gradient sizes comparable across temperatures): a higher temperature gives smaller
  gradients at the same kd_ratio.
- `forward_kl`: KL(P || Q) = sum_v P log(P / Q), the "supervised KD" of the GKD paper; TRL's beta = 0. It includes
  the teacher's entropy, a constant for the student: torchtune's ForwardKLLoss leaves that term out (same gradient,
  a value larger by the entropy).
- `reverse_kl`: KL(Q || P), mode-seeking; TRL's beta = 1.
- `jsd`: the generalized Jensen-Shannon divergence of GKD eq. 1 with M = beta P + (1 - beta) Q:
  beta KL(P || M) + (1 - beta) KL(Q || M); TRL's 0 < beta < 1 (TRL's GKDConfig default 0.5). Near beta = 0 it is
  about beta times the forward KL, near 1 about (1 - beta) times the reverse KL: TRL switches to the plain KLs at
  the ends, so here the ends are named forward_kl and reverse_kl and jsd takes beta strictly inside (0, 1).
- Mixing with cross-entropy: loss = kd_ratio * KD + (1 - kd_ratio) * CE, torchtune's KD recipes' `kd_ratio` (also
  NeMo AutoModel's); CE is the student's at temperature 1 on the labels, as in Hinton et al. TRL's GKD has no CE
  term (kd_ratio 1).
"""

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmforge.data.dataset import IGNORE_INDEX
from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer
from lmforge.train.loss import CHUNK_ROWS

Divergence = Literal["forward_kl", "reverse_kl", "jsd"]


@dataclass(frozen=True, slots=True)
class DistillSettings:
    """What the student is trained to match. beta is used by `jsd` alone (forward_kl and reverse_kl are its ends)."""

    loss: Divergence = "forward_kl"
    beta: float = 0.5  # jsd's mixture weight on the teacher, TRL's GKD beta
    temperature: float = 1.0
    kd_ratio: float = 0.5  # weight of the divergence; 1 - kd_ratio weighs the cross-entropy (torchtune's default)

    def __post_init__(self) -> None:
        if self.loss not in ("forward_kl", "reverse_kl", "jsd"):
            raise ValueError(f"unknown distillation loss {self.loss!r}: use forward_kl, reverse_kl or jsd")
        if self.loss == "jsd" and not 0 < self.beta < 1:
            raise ValueError(f"jsd's beta must lie strictly between 0 and 1, got {self.beta} (beta 0 is forward_kl, "
                             f"beta 1 is reverse_kl)")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a positive number, got {self.temperature}")
        if not 0 <= self.kd_ratio <= 1:
            raise ValueError(f"kd_ratio must lie in [0, 1], got {self.kd_ratio}")

    def mix(self, kd: torch.Tensor, ce: torch.Tensor) -> torch.Tensor:
        """The training loss from the divergence and the cross-entropy, both already divided by the trained tokens."""
        return self.kd_ratio * kd + (1 - self.kd_ratio) * ce


def token_divergence(student_logps: torch.Tensor, teacher_logps: torch.Tensor, loss: Divergence,
                     beta: float = 0.5) -> torch.Tensor:
    """Per row, the divergence between two log-probability rows [rows, vocab] (log_softmax at the temperature)."""
    if loss == "forward_kl":
        return _kl(teacher_logps, student_logps)
    if loss == "reverse_kl":
        return _kl(student_logps, teacher_logps)
    mixture = torch.logaddexp(teacher_logps + math.log(beta), student_logps + math.log1p(-beta))
    return beta * _kl(teacher_logps, mixture) + (1 - beta) * _kl(student_logps, mixture)


def _kl(p_logps: torch.Tensor, q_logps: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row from log-probabilities."""
    return (p_logps.exp() * (p_logps - q_logps)).sum(dim=-1)


def distill_loss_sum(student: nn.Module, student_hidden: torch.Tensor, teacher: nn.Module,
                     teacher_hidden: torch.Tensor, labels: torch.Tensor,
                     settings: DistillSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the per-token divergence, sum of the student's cross-entropy) over rows with labels != IGNORE_INDEX.

    student_hidden [T, H] and teacher_hidden [T, H'] are the two models' outputs on the same tokens (hidden sizes
    may differ), labels [T] the next token at each row. The caller divides both sums by the trained tokens of the
    whole accumulation window (as for token_loss_sum) and mixes them with settings.mix. The vocabulary projections
    run in chunks of rows, recomputed in backward (activation checkpointing), so no [T, vocab] logits exist at once
    in forward or backward; the teacher's run under no_grad and get no gradient."""
    if not len(student_hidden) == len(teacher_hidden) == len(labels):
        raise ValueError(f"the student has {len(student_hidden)} hidden rows, the teacher {len(teacher_hidden)} and "
                         f"the labels {len(labels)}: they must describe the same tokens")
    rows = (labels != IGNORE_INDEX).nonzero().squeeze(1)
    student_hidden, labels = student_hidden.index_select(0, rows), labels.index_select(0, rows)
    teacher_hidden = teacher_hidden.detach().index_select(0, rows)
    total = student_hidden.new_zeros(2, dtype=torch.float32)
    for start in range(0, len(rows), CHUNK_ROWS):
        end = start + CHUNK_ROWS
        chunk = (student, student_hidden[start:end], teacher, teacher_hidden[start:end], labels[start:end], settings)
        sums = checkpoint(_chunk_sums, *chunk, use_reentrant=False) if torch.is_grad_enabled() else _chunk_sums(*chunk)
        total = total + sums
    return total[0], total[1]


def _chunk_sums(student: nn.Module, student_hidden: torch.Tensor, teacher: nn.Module, teacher_hidden: torch.Tensor,
                labels: torch.Tensor, settings: DistillSettings) -> torch.Tensor:
    logits = student.logits(student_hidden)  # float32
    with torch.no_grad():
        teacher_logps = F.log_softmax(teacher.logits(teacher_hidden).div_(settings.temperature), dim=-1)
    if teacher_logps.shape[-1] != logits.shape[-1]:
        raise LmforgeError(f"the teacher's output layer has {teacher_logps.shape[-1]} logits per token and the "
                           f"student's {logits.shape[-1]}; distillation needs a teacher with the student's vocabulary")
    return _DivergenceCrossEntropy.apply(logits, teacher_logps, labels, settings)


class _DivergenceCrossEntropy(torch.autograd.Function):
    """A chunk's (divergence sum, cross-entropy sum) from the student's logits z [rows, vocab] and the teacher's
    log-probs at the temperature (this chunk's own: overwritten), with the gradients w.r.t. z computed in closed form
    in forward, as loss.py's fused cross-entropy does: backward keeps those two tensors rather than every
    intermediate of autograd's graph (log_softmax, exp, the mixture, products). With Q = softmax(z / T), P the
    teacher's and M = beta P + (1 - beta) Q: d/dz = (Q - P) / T for forward_kl, and Q * (g - sum(Q * g)) / T with
    g = dL/dQ up to a constant for the others, g = log Q - log P (reverse_kl) or (1 - beta) log(Q / M) (jsd)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, teacher_logps: torch.Tensor, labels: torch.Tensor,
                settings: DistillSettings) -> torch.Tensor:
        t, beta = settings.temperature, settings.beta
        student_logps = F.log_softmax(logits / t if t != 1 else logits, dim=-1)
        kd = token_divergence(student_logps, teacher_logps, settings.loss, beta).sum()
        if not ctx.needs_input_grad[0]:  # evaluation
            return torch.stack([kd, F.cross_entropy(logits, labels, reduction="sum")])
        q = student_logps.exp()
        if settings.loss == "forward_kl":
            grad_kd = q.sub_(teacher_logps.exp_())
        else:
            if settings.loss == "reverse_kl":
                g = student_logps.sub_(teacher_logps)
            else:
                mixture = torch.logaddexp(teacher_logps.add_(math.log(beta)), student_logps + math.log1p(-beta))
                g = student_logps.sub_(mixture).mul_(1 - beta)
            grad_kd = q.mul_(g.sub_((q * g).sum(dim=-1, keepdim=True)))
        grad_kd.div_(t)
        # cross-entropy at temperature 1: softmax(z) - onehot(label)
        logps = F.log_softmax(logits, dim=-1)
        rows = torch.arange(len(labels), device=labels.device)
        ce = -logps[rows, labels].sum()
        grad_ce = logps.exp_()
        grad_ce[rows, labels] -= 1
        ctx.save_for_backward(grad_kd, grad_ce)
        return torch.stack([kd, ce])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        grad_kd, grad_ce = ctx.saved_tensors
        return grad_kd * grad_out[0] + grad_ce * grad_out[1], None, None, None


def check_same_vocabulary(student: Tokenizer, teacher: Tokenizer, where: str) -> None:
    """Raises LmforgeError unless both tokenizers map every token id to the same token (added tokens included):
    the divergence compares the two distributions id by id. `where` names the setting (e.g. the config's teacher)."""
    student_vocab = student.backend.get_vocab(with_added_tokens=True)
    teacher_vocab = teacher.backend.get_vocab(with_added_tokens=True)
    if student_vocab == teacher_vocab:
        return
    if len(student_vocab) != len(teacher_vocab):
        raise LmforgeError(f"{where}: the teacher's tokenizer ({teacher.name}) has {len(teacher_vocab)} tokens and "
                           f"the student's ({student.name}) {len(student_vocab)}; distillation needs a teacher with "
                           f"the student's vocabulary")
    student_tokens = {i: token for token, i in student_vocab.items()}
    teacher_tokens = {i: token for token, i in teacher_vocab.items()}
    token_id = min(i for i in student_tokens.keys() | teacher_tokens.keys()
                   if student_tokens.get(i) != teacher_tokens.get(i))
    raise LmforgeError(f"{where}: token id {token_id} is {teacher_tokens.get(token_id)!r} in the teacher's tokenizer "
                       f"({teacher.name}) but {student_tokens.get(token_id)!r} in the student's ({student.name}); "
                       f"distillation needs a teacher with the student's vocabulary")
