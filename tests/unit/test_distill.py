"""train/distill.py beyond TRL parity (tests/parity/test_distill_trl.py): the divergences against torch's kl_div
and probability-space formulas, chunking, memory, the teacher's vocabulary check and bad settings."""

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer as Backend
from tokenizers import models, pre_tokenizers

from lmforge import kernels
from lmforge.data.dataset import IGNORE_INDEX
from lmforge.errors import LmforgeError
from lmforge.layers.attention import AttnMeta
from lmforge.tokenizer import Tokenizer
from lmforge.train import distill
from lmforge.train.distill import DistillSettings, check_same_vocabulary, distill_loss_sum, token_divergence
from tests.tiny import TINY_LLAMA, tiny_model

VOCAB = TINY_LLAMA["vocab_size"]
TEACHER = TINY_LLAMA | {"hidden_size": 48, "intermediate_size": 96}
LENGTHS = (13, 8, 17)


@pytest.fixture(scope="module")
def hidden():
    """Student and teacher hidden states of one packed batch, and labels with some rows ignored."""
    student, teacher = tiny_model(), tiny_model(TEACHER)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, VOCAB, (sum(LENGTHS),), generator=g)
    positions = torch.cat([torch.arange(n) for n in LENGTHS])
    meta = AttnMeta.for_sequences(list(LENGTHS))
    labels = torch.cat([ids[1:], torch.tensor([IGNORE_INDEX])])
    labels[torch.rand(len(labels), generator=g) < 0.3] = IGNORE_INDEX
    with torch.no_grad():
        teacher_hidden = teacher(ids, positions, meta)
    return student, teacher, (ids, positions, meta), teacher_hidden, labels


def sums_and_grads(hidden, settings, chunk_rows, monkeypatch):
    student, teacher, inputs, teacher_hidden, labels = hidden
    monkeypatch.setattr(distill, "CHUNK_ROWS", chunk_rows)
    kd, ce = distill_loss_sum(student, student(*inputs), teacher, teacher_hidden, labels, settings)
    return kd, ce, torch.autograd.grad(kd + ce, list(student.parameters()))


@pytest.mark.parametrize("settings", [DistillSettings("forward_kl", temperature=2.0), DistillSettings("jsd", 0.3),
                                      DistillSettings("reverse_kl")], ids=lambda s: s.loss)
def test_chunked_equals_one_chunk(hidden, settings, monkeypatch):
    with kernels.bitwise():  # batch-invariant products on every CPU (MKL's are not): only the chunking differs
        kd, ce, grads = sums_and_grads(hidden, settings, 3, monkeypatch)
        kd_one, ce_one, grads_one = sums_and_grads(hidden, settings, 10_000, monkeypatch)
    assert kd.item() == pytest.approx(kd_one.item(), rel=1e-6)
    assert ce.item() == pytest.approx(ce_one.item(), rel=1e-6)
    for a, b in zip(grads, grads_one, strict=True):  # fp32 sums in another order: one thread differs from two
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_no_grad_gives_the_same_sums(hidden, monkeypatch):
    student, teacher, inputs, teacher_hidden, labels = hidden
    settings = DistillSettings("jsd")
    kd, ce, _ = sums_and_grads(hidden, settings, 4, monkeypatch)
    with torch.no_grad():
        kd_eval, ce_eval = distill_loss_sum(student, student(*inputs), teacher, teacher_hidden, labels, settings)
    assert (kd_eval.item(), ce_eval.item()) == pytest.approx((kd.item(), ce.item()), rel=1e-6)


def test_autograd_keeps_no_vocabulary_wide_tensor(hidden, monkeypatch):
    """What autograd saves for backward during the forward holds no logits-shaped rows: the chunks are recomputed.
    (Without the checkpoint, every chunk would save several [rows, vocab] tensors.)"""
    student, teacher, inputs, teacher_hidden, labels = hidden
    monkeypatch.setattr(distill, "CHUNK_ROWS", 4)
    student.zero_grad(set_to_none=True)
    student_hidden = student(*inputs)
    saved_rows = []

    def pack(t):
        if t.dim() and t.shape[-1] == VOCAB and t.is_floating_point():
            saved_rows.append(t.numel() // VOCAB)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        kd, ce = distill_loss_sum(student, student_hidden, teacher, teacher_hidden, labels, DistillSettings("jsd"))
    (kd + ce).backward()
    assert sum(saved_rows) == 0
    assert student.lm_head.weight.grad.abs().max() > 0


def test_divergences_equal_torch_kl_div_and_probability_formulas():
    g = torch.Generator().manual_seed(7)
    student_logits, teacher_logits = torch.randn(2, 6, VOCAB, generator=g).mul(3).unbind(0)
    for t in (1.0, 2.0, 0.5):
        s, te = F.log_softmax(student_logits / t, -1), F.log_softmax(teacher_logits / t, -1)
        # kl_div(input, target) is KL(target || input)
        forward = F.kl_div(s, te, reduction="none", log_target=True).sum(-1)
        reverse = F.kl_div(te, s, reduction="none", log_target=True).sum(-1)
        torch.testing.assert_close(token_divergence(s, te, "forward_kl"), forward)
        torch.testing.assert_close(token_divergence(s, te, "reverse_kl"), reverse)
        p, q = te.double().exp(), s.double().exp()
        for beta in (0.1, 0.5, 0.9):
            m = beta * p + (1 - beta) * q  # GKD eq. 1, in probability space and float64
            jsd = beta * (p * (p / m).log()).sum(-1) + (1 - beta) * (q * (q / m).log()).sum(-1)
            torch.testing.assert_close(token_divergence(s, te, "jsd", beta).double(), jsd, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_closed_form_gradients_equal_autograd(loss, temperature):
    """The chunk Function's d(loss)/d(student logits) against torch autograd through log_softmax, the divergence and
    cross_entropy, with unequal weights on the two sums (the caller's kd_ratio / tokens)."""
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(7, VOCAB, generator=g).mul(4).requires_grad_()
    teacher_logits = torch.randn(7, VOCAB, generator=g).mul(4)
    labels = torch.randint(0, VOCAB, (7,), generator=g)
    settings = DistillSettings(loss, beta=0.3, temperature=temperature)
    teacher_logps = F.log_softmax(teacher_logits / temperature, dim=-1)
    weights = torch.tensor([0.7, 0.2])
    ours = distill._DivergenceCrossEntropy.apply(logits, teacher_logps.clone(), labels, settings)
    (ours_grad,) = torch.autograd.grad((ours * weights).sum(), logits)
    kd = token_divergence(F.log_softmax(logits / temperature, dim=-1), teacher_logps, loss, 0.3).sum()
    ce = F.cross_entropy(logits, labels, reduction="sum")
    (reference_grad,) = torch.autograd.grad(0.7 * kd + 0.2 * ce, logits)
    torch.testing.assert_close(ours.detach(), torch.stack([kd, ce]).detach())
    torch.testing.assert_close(ours_grad, reference_grad, rtol=1e-5, atol=1e-7)


def test_no_trained_rows_gives_zero(hidden):
    student, teacher, inputs, teacher_hidden, labels = hidden
    ignored = torch.full_like(labels, IGNORE_INDEX)
    kd, ce = distill_loss_sum(student, student(*inputs), teacher, teacher_hidden, ignored, DistillSettings())
    assert kd.item() == 0 and ce.item() == 0


def test_mismatched_rows_and_heads_are_refused(hidden):
    student, teacher, inputs, teacher_hidden, labels = hidden
    with pytest.raises(ValueError, match="the same tokens"):
        distill_loss_sum(student, student(*inputs), teacher, teacher_hidden[:-1], labels, DistillSettings())
    wider = tiny_model(TINY_LLAMA | {"vocab_size": VOCAB + 32})
    with pytest.raises(LmforgeError, match=f"{VOCAB + 32} logits per token and the student's {VOCAB}"):
        distill_loss_sum(student, student(*inputs), wider, teacher_hidden[:, :32], labels, DistillSettings())


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"loss": "kl"}, "unknown distillation loss"),
    ({"loss": "jsd", "beta": 0.0}, "strictly between 0 and 1"),
    ({"loss": "jsd", "beta": 1.0}, "strictly between 0 and 1"),
    ({"temperature": 0.0}, "temperature"),
    ({"temperature": float("inf")}, "temperature"),
    ({"kd_ratio": 1.5}, "kd_ratio"),
])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DistillSettings(**kwargs)


def test_mix_weighs_the_divergence_by_kd_ratio():
    settings = DistillSettings(kd_ratio=0.25)
    assert settings.mix(torch.tensor(4.0), torch.tensor(8.0)).item() == pytest.approx(0.25 * 4 + 0.75 * 8)


def word_tokenizer(words: list[str], name: str) -> Tokenizer:
    backend = Backend(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return Tokenizer(backend, name=name)


def test_teacher_with_another_vocabulary_is_refused():
    words = ["<unk>", "hello", "world", "pirate", "arr"]
    student = word_tokenizer(words, "student-dir")
    check_same_vocabulary(student, word_tokenizer(list(words), "same-dir"), "teacher")  # same map: accepted

    with pytest.raises(LmforgeError) as bigger:
        check_same_vocabulary(student, word_tokenizer([*words, "matey"], "big-dir"), "teacher")
    assert str(bigger.value) == ("teacher: the teacher's tokenizer (big-dir) has 6 tokens and the student's "
                                 "(student-dir) 5; distillation needs a teacher with the student's vocabulary")

    swapped = ["<unk>", "hello", "pirate", "world", "arr"]  # same tokens, ids 2 and 3 exchanged
    with pytest.raises(LmforgeError) as renumbered:
        check_same_vocabulary(student, word_tokenizer(swapped, "swapped-dir"), "teacher")
    assert str(renumbered.value) == ("teacher: token id 2 is 'pirate' in the teacher's tokenizer (swapped-dir) but "
                                     "'world' in the student's (student-dir); distillation needs a teacher with the "
                                     "student's vocabulary")

    renamed = ["<unk>", "hello", "world", "pirate", "ahoy"]  # same size, one token differs
    with pytest.raises(LmforgeError, match="token id 4 is 'ahoy'"):
        check_same_vocabulary(student, word_tokenizer(renamed, "renamed-dir"), "teacher")
