"""lmforge's distillation losses (train/distill.py) against TRL's own GKD loss (TRL is a test-only reference).

TRL 1.16 keeps the loss in a static method, trl.experimental.gkd.GKDTrainer.generalized_jsd_loss(student_logits,
teacher_logits, labels, beta, temperature), called here as it is on right-padded [rows, width, vocab] logits of a
tiny student and a tiny teacher (another size, same vocabulary), each row run alone. lmforge sees the same rows as
one flat packed batch with its labels, chunked by rows. TRL's beta 0 is lmforge's forward_kl, beta 1 its
reverse_kl, anything between its jsd. The cross-entropy half of the mixed loss, which GKD does not have, is
checked against torch's cross_entropy.
"""

import pytest
import torch
import torch.nn.functional as F
from trl.experimental.gkd import GKDTrainer  # pinned in the test extra: a missing reference fails, never skips

from lmforge.data.dataset import IGNORE_INDEX
from lmforge.layers.attention import AttnMeta
from lmforge.train import distill
from lmforge.train.distill import DistillSettings, distill_loss_sum
from tests.tiny import TINY_LLAMA, tiny_model

TOL = 1e-5
VOCAB = TINY_LLAMA["vocab_size"]
TEACHER = TINY_LLAMA | {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 3}
LENGTHS = (9, 6, 11)
PROMPTS = (3, 1, 4)  # leading positions not trained, as a chat template's prompt


@pytest.fixture(scope="module")
def models():
    student = tiny_model()
    teacher = tiny_model(TEACHER)
    for p in teacher.parameters():  # the teacher is frozen; the loss must not need it to be
        p.requires_grad_(False)
    teacher.lm_head.weight.mul_(4)  # a confident teacher: divergences far from 0, gradients far from rounding
    return student, teacher


@pytest.fixture(scope="module")
def batch():
    """Token ids per document and labels: the next token, IGNORE_INDEX over the prompt, at the last position and at
    one position inside an answer (a masked turn)."""
    g = torch.Generator().manual_seed(3)
    docs, labels = [], []
    for n, prompt in zip(LENGTHS, PROMPTS, strict=True):
        ids = torch.randint(0, VOCAB, (n,), generator=g)
        lab = torch.cat([ids[1:], torch.tensor([IGNORE_INDEX])])
        lab[:prompt] = IGNORE_INDEX
        lab[n - 3] = IGNORE_INDEX
        docs.append(ids)
        labels.append(lab)
    return docs, labels


def packed_hidden(model, docs):
    lens = [len(d) for d in docs]
    return model(torch.cat(docs), torch.cat([torch.arange(n) for n in lens]), AttnMeta.for_sequences(lens))


def padded_logits(model, docs):
    """TRL's layout: each row alone through the model, right-padded with zeros: [rows, width, vocab] float32."""
    width = max(len(d) for d in docs)
    rows = []
    for ids in docs:
        n = len(ids)
        logits = model.logits(model(ids, torch.arange(n), AttnMeta.for_sequences([n])))
        rows.append(F.pad(logits, (0, 0, 0, width - n)))
    return torch.stack(rows)


def padded_labels(labels):
    width = max(len(lab) for lab in labels)
    return torch.stack([F.pad(lab, (0, width - len(lab)), value=IGNORE_INDEX) for lab in labels])


def trl_beta(settings: DistillSettings) -> float:
    return {"forward_kl": 0.0, "reverse_kl": 1.0}.get(settings.loss, settings.beta)


def lmforge_mean(student, teacher, docs, labels, settings, monkeypatch):
    """Per-trained-token means of the divergence and the cross-entropy, through several chunks of rows."""
    monkeypatch.setattr(distill, "CHUNK_ROWS", 4)
    with torch.no_grad():
        teacher_hidden = packed_hidden(teacher, docs)
    flat = torch.cat(labels)
    kd, ce = distill_loss_sum(student, packed_hidden(student, docs), teacher, teacher_hidden, flat, settings)
    tokens = int((flat != IGNORE_INDEX).sum())
    return kd / tokens, ce / tokens


def trl_mean(student, teacher, docs, labels, settings):
    with torch.no_grad():
        teacher_logits = padded_logits(teacher, docs)
    return GKDTrainer.generalized_jsd_loss(padded_logits(student, docs), teacher_logits, padded_labels(labels),
                                           beta=trl_beta(settings), temperature=settings.temperature)


def name(s: DistillSettings) -> str:
    return f"{s.loss}-beta{s.beta}-T{s.temperature}"


SETTINGS = [DistillSettings(loss, beta=beta, temperature=t)
            for loss, beta in [("forward_kl", 0.5), ("jsd", 0.5), ("jsd", 0.1), ("jsd", 0.9), ("reverse_kl", 0.5)]
            for t in (1.0, 2.0)]


@pytest.mark.parametrize("settings", SETTINGS, ids=name)
def test_divergence_and_student_gradients_match_trl_gkd(models, batch, settings, monkeypatch):
    student, teacher = models
    docs, labels = batch
    params = list(student.parameters())
    ours, _ = lmforge_mean(student, teacher, docs, labels, settings, monkeypatch)
    ours_grads = torch.autograd.grad(ours, params)
    theirs = trl_mean(student, teacher, docs, labels, settings)
    theirs_grads = torch.autograd.grad(theirs, params)
    assert theirs.item() > 0.01  # the two models disagree: a loss of 0 would prove nothing
    assert ours.item() == pytest.approx(theirs.item(), abs=TOL)
    for p, a, b in zip(student.state_dict(), ours_grads, theirs_grads, strict=True):
        assert (a - b).abs().max().item() < TOL, p
        # every parameter is reached, and small gradients agree relatively too
        assert (a - b).abs().max().item() <= 1e-4 * b.abs().max().item(), p


@pytest.mark.parametrize("settings", [DistillSettings("jsd", beta=0.5, temperature=2.0, kd_ratio=0.3),
                                      DistillSettings("forward_kl", kd_ratio=0.7)], ids=name)
def test_mixed_loss_matches_trl_gkd_plus_torch_cross_entropy(models, batch, settings, monkeypatch):
    student, teacher = models
    docs, labels = batch
    params = list(student.parameters())
    kd, ce = lmforge_mean(student, teacher, docs, labels, settings, monkeypatch)
    ours = settings.mix(kd, ce)
    ours_grads = torch.autograd.grad(ours, params)
    logits, target = padded_logits(student, docs), padded_labels(labels)
    with torch.no_grad():
        teacher_logits = padded_logits(teacher, docs)
    reference_ce = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=IGNORE_INDEX)
    reference_kd = GKDTrainer.generalized_jsd_loss(logits, teacher_logits, target, beta=trl_beta(settings),
                                                   temperature=settings.temperature)
    theirs = settings.kd_ratio * reference_kd + (1 - settings.kd_ratio) * reference_ce
    theirs_grads = torch.autograd.grad(theirs, params)
    assert ce.item() == pytest.approx(reference_ce.item(), abs=TOL)
    assert ours.item() == pytest.approx(theirs.item(), abs=TOL)
    for p, a, b in zip(student.state_dict(), ours_grads, theirs_grads, strict=True):
        assert (a - b).abs().max().item() < TOL, p
        assert (a - b).abs().max().item() <= 1e-4 * b.abs().max().item(), p


def test_teacher_gets_no_gradient(batch, monkeypatch):
    """A teacher whose parameters require grad, run with autograd on: the loss still reaches the student alone."""
    student, teacher = tiny_model(), tiny_model(TEACHER)
    docs, labels = batch
    monkeypatch.setattr(distill, "CHUNK_ROWS", 4)
    kd, ce = distill_loss_sum(student, packed_hidden(student, docs), teacher, packed_hidden(teacher, docs),
                              torch.cat(labels), DistillSettings("jsd"))
    (kd + ce).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in student.parameters())
