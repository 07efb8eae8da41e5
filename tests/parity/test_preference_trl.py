"""lmforge's preference losses (train/preference.py) against TRL's own loss code (TRL is a test-only reference).

TRL 1.16 exposes no standalone DPO / KTO loss functions: the math sits inside DPOTrainer._compute_loss and
KTOTrainer._compute_loss, which read a handful of trainer attributes and call the model for per-token log-probs.
Those methods are called here unbound, on a stand-in carrying exactly those attributes, with a stand-in model that
returns per-token log-probs of a tiny lmforge model run on each padded row alone (plain full log_softmax), so TRL
does its own reductions. CPO (simpo) runs CPOTrainer.get_batch_loss_metrics the same way on full logits; ORPO binds
ORPOTrainer.odds_ratio_loss. TRL 1.16 dropped DPO's `rpo_alpha`: its replacement, loss_type ["sigmoid", "sft"] with
loss_weights [1, rpo_alpha], is what lmforge's rpo_alpha is compared with. TRL's ORPO NLL covers the prompt tokens
too; lmforge's is the chosen answer's alone (the paper's L_SFT), so that term is checked against torch's
cross_entropy on the answer tokens instead.
"""

import copy
import types
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F
from trl import DPOTrainer, KTOTrainer  # pinned in the test extra: a missing reference fails, never skips
from trl.experimental.cpo import CPOTrainer
from trl.experimental.orpo import ORPOTrainer

from lmforge.data.dataset import IGNORE_INDEX
from lmforge.layers.attention import AttnMeta
from lmforge.train import loss as loss_module
from lmforge.train import preference
from lmforge.train.preference import PreferenceSettings, kto_loss, preference_loss, sequence_logps
from tests.tiny import tiny_model

TOL = 1e-5
VOCAB = 96
PROMPTS, CHOSEN, REJECTED = (5, 3, 7), (4, 6, 2), (3, 5, 6)  # tokens per pair


@pytest.fixture(scope="module")
def models():
    policy = tiny_model()
    reference = tiny_model()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return policy, reference


@pytest.fixture(scope="module")
def pairs():
    g = torch.Generator().manual_seed(2)
    rand = lambda n: torch.randint(0, VOCAB, (n,), generator=g)  # noqa: E731
    return [(rand(p), rand(c), rand(r)) for p, c, r in zip(PROMPTS, CHOSEN, REJECTED, strict=True)]


# --- lmforge's layout: one flat packed batch, documents prompt+chosen, prompt+rejected per pair -----------------

def packed(pairs):
    docs, labels = [], []
    for prompt, *answers in pairs:
        for answer in answers:
            ids = torch.cat([prompt, answer])
            lab = torch.full_like(ids, IGNORE_INDEX)
            lab[len(prompt) - 1:-1] = answer  # position t predicts token t + 1
            docs.append(ids)
            labels.append(lab)
    lens = [len(d) for d in docs]
    return torch.cat(docs), torch.cat([torch.arange(n) for n in lens]), torch.cat(labels), lens


def lmforge_logps(model, pairs):
    ids, positions, labels, lens = packed(pairs)
    meta = AttnMeta.for_sequences(lens)
    logps, counts = sequence_logps(model, model(ids, positions, meta), labels, meta.cu_seqlens_q)
    return logps[0::2], logps[1::2], counts[0::2], counts[1::2]


def rows_logps(model, ids, attention, completion):
    """Padded rows (TRL's layout) packed flat, one document each, through sequence_logps."""
    docs, labels = [], []
    for row, mask, answer in zip(ids, attention, completion, strict=True):
        n = int(mask.sum())
        lab = row[1:n].masked_fill(answer[1:n] == 0, IGNORE_INDEX)
        docs.append(row[:n])
        labels.append(torch.cat([lab, torch.tensor([IGNORE_INDEX])]))
    lens = [len(d) for d in docs]
    meta = AttnMeta.for_sequences(lens)
    hidden = model(torch.cat(docs), torch.cat([torch.arange(n) for n in lens]), meta)
    return sequence_logps(model, hidden, torch.cat(labels), meta.cu_seqlens_q)


# --- TRL's layout: right-padded rows, chosen rows then rejected rows ---------------------------------------------

def padded(pairs):
    rows = [(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs]
    width = max(len(p) + len(a) for p, a in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    attention = torch.zeros_like(ids)
    completion = torch.zeros_like(ids)
    for i, (p, a) in enumerate(rows):
        n = len(p) + len(a)
        ids[i, :n], attention[i, :n], completion[i, len(p):n] = torch.cat([p, a]), 1, 1
    return ids, attention, completion


def plain_logits(model, ids, attention):
    """Each row alone, unpadded, through lmforge's model: [rows, width, vocab] float32 (zeros at padding)."""
    out = torch.zeros(*ids.shape, VOCAB)
    for i in range(len(ids)):
        n = int(attention[i].sum())
        out[i, :n] = model.logits(model(ids[i, :n], torch.arange(n), AttnMeta.for_sequences([n])))
    return out


def plain_token_logps(model, ids, attention, labels):
    """TRL's fused-head output layout: [rows, width - 1], log p(token t + 1), 0 where labels[t + 1] is -100."""
    logps = plain_logits(model, ids, attention)[:, :-1].log_softmax(-1)
    target = ids[:, 1:]
    return logps.gather(2, target[..., None]).squeeze(2) * (labels[:, 1:] != IGNORE_INDEX)


class Accelerator:
    device = torch.device("cpu")
    gather = gather_for_metrics = staticmethod(lambda x: x)
    unwrap_model = staticmethod(lambda m: m)


def trainer_standin(**attrs):
    return types.SimpleNamespace(model=types.SimpleNamespace(training=True), accelerator=Accelerator(),
                                 aux_loss_enabled=False, _metrics=defaultdict(lambda: defaultdict(list)),
                                 _total_train_tokens=0, _tp_size=1, **attrs)


def fused_standin_model(per_token_fn):
    def forward(input_ids, attention_mask, labels, **_):
        zeros = torch.zeros(input_ids.shape[0], input_ids.shape[1] - 1)
        return types.SimpleNamespace(log_probs=per_token_fn(input_ids, attention_mask, labels), entropy=zeros,
                                     mean_logits=zeros, is_top1=zeros.bool())
    return forward


def trl_dpo(settings: PreferenceSettings, model_fn, ids, attention, completion, ref_c, ref_r):
    loss_types, weights = [settings.loss_type], [1.0]
    if settings.rpo_alpha:
        loss_types, weights = [settings.loss_type, "sft"], [1.0, settings.rpo_alpha]
    standin = trainer_standin(ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
                              loss_types=loss_types, loss_weights=weights, beta=settings.beta,
                              label_smoothing=settings.label_smoothing, use_weighting=False)
    inputs = {"input_ids": ids, "attention_mask": attention, "completion_mask": completion,
              "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r}
    loss = DPOTrainer._compute_loss(standin, fused_standin_model(model_fn), inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in standin._metrics["train"].items()}


def check_metrics(ours: dict, theirs: dict):
    for key, value in ours.items():
        assert value.item() == pytest.approx(theirs[key], abs=TOL), key


def short(s: PreferenceSettings) -> str:
    return f"{s.loss_type}-beta{s.beta}-ls{s.label_smoothing}-rpo{s.rpo_alpha}"


DPO_SETTINGS = [
    PreferenceSettings("sigmoid", beta=0.1), PreferenceSettings("sigmoid", beta=0.5, rpo_alpha=0.7),
    PreferenceSettings("ipo", beta=0.1), PreferenceSettings("ipo", beta=0.3, rpo_alpha=1.0),
    PreferenceSettings("hinge", beta=0.2), PreferenceSettings("hinge", beta=2.0, rpo_alpha=0.5),
    PreferenceSettings("robust", beta=0.1, label_smoothing=0.1),
    PreferenceSettings("robust", beta=0.4, label_smoothing=0.3, rpo_alpha=0.2),
]


@pytest.mark.parametrize("settings", DPO_SETTINGS, ids=short)
def test_dpo_family_matches_trl_loss_and_logp_gradients(models, pairs, settings):
    policy, reference = models
    ids, attention, completion = padded(pairs)
    labels = ids.masked_fill(completion == 0, IGNORE_INDEX)
    with torch.no_grad():
        per_token = plain_token_logps(policy, ids, attention, labels)
        ref = plain_token_logps(reference, ids, attention, labels).sum(1)
    ref_c, ref_r = ref.chunk(2)
    leaf = per_token.clone().requires_grad_()
    theirs, metrics = trl_dpo(settings, lambda *_: leaf, ids, attention, completion, ref_c, ref_r)
    (theirs_grad,) = torch.autograd.grad(theirs, leaf)

    leaf = per_token.clone().requires_grad_()  # lmforge sees the same log-probs as per-answer sums
    scored = labels[:, 1:] != IGNORE_INDEX
    tokens = completion.sum(1)
    chosen, rejected = (leaf * scored).sum(1).chunk(2)
    out = preference_loss(settings, chosen, rejected, *tokens.chunk(2), ref_c, ref_r)
    (ours_grad,) = torch.autograd.grad(out.loss, leaf)
    assert out.loss.item() == pytest.approx(theirs.item(), abs=TOL)
    # TRL's model output is 0 off the answers and TRL sums whole rows; the log-probs exist at answer tokens only
    assert (ours_grad - theirs_grad)[scored].abs().max() < TOL
    assert ours_grad[scored].abs().min() > 0
    check_metrics(out.metrics, metrics)


@pytest.mark.parametrize("settings", [PreferenceSettings("sigmoid", beta=0.5, rpo_alpha=0.7),
                                      PreferenceSettings("ipo", beta=0.3),
                                      PreferenceSettings("robust", beta=0.4, label_smoothing=0.3)], ids=short)
@pytest.mark.parametrize("head", ["trained", "frozen", "frozen-eager"])
def test_dpo_parameter_gradients_through_packed_batch_match_trl(models, pairs, settings, head, monkeypatch):
    """A trained head is recomputed in backward chunk by chunk; a frozen one (LoRA) goes through the fused
    log-probs of train/loss.py, with the CPU kernel or without it (eager)."""
    monkeypatch.setattr(preference, "CHUNK_ROWS", 4)  # several chunks
    monkeypatch.setattr(loss_module, "CHUNK_ROWS", 4)
    if head == "frozen-eager":
        monkeypatch.setattr(loss_module.kernels, "available", lambda device: None)
    policy, reference = models
    if head != "trained":
        policy = copy.deepcopy(policy)
        policy.lm_head.weight.requires_grad_(False)
    named = [(n, p) for n, p in policy.named_parameters() if p.requires_grad]
    ids, attention, completion = padded(pairs)
    labels = ids.masked_fill(completion == 0, IGNORE_INDEX)
    with torch.no_grad():
        ref_c, ref_r = plain_token_logps(reference, ids, attention, labels).sum(1).chunk(2)
    theirs, _ = trl_dpo(settings, lambda i, a, lab: plain_token_logps(policy, i, a, lab), ids, attention, completion,
                        ref_c, ref_r)
    theirs_grads = torch.autograd.grad(theirs, [p for _, p in named])

    with torch.no_grad():
        ours_ref_c, ours_ref_r, *_ = lmforge_logps(reference, pairs)
    assert torch.allclose(ours_ref_c, ref_c, atol=TOL) and torch.allclose(ours_ref_r, ref_r, atol=TOL)
    out = preference_loss(settings, *lmforge_logps(policy, pairs), ours_ref_c, ours_ref_r)
    ours_grads = torch.autograd.grad(out.loss, [p for _, p in named])
    assert out.loss.item() == pytest.approx(theirs.item(), abs=TOL)
    for (name, _), a, b in zip(named, ours_grads, theirs_grads, strict=True):
        assert (a - b).abs().max() < TOL, name


@pytest.mark.parametrize("beta,gamma,smoothing,cpo_alpha", [(2.0, 0.5, 0.0, 0.0), (2.5, 1.0, 0.2, 0.0),
                                                            (1.0, 0.3, 0.1, 0.5)])
def test_simpo_matches_trl_cpo_trainer(models, pairs, beta, gamma, smoothing, cpo_alpha):
    policy, _ = models
    ids, attention, completion = padded(pairs)
    labels = ids.masked_fill(completion == 0, IGNORE_INDEX)
    n = len(pairs)
    batch = {"chosen_input_ids": ids[:n], "chosen_attention_mask": attention[:n], "chosen_labels": labels[:n],
             "rejected_input_ids": ids[n:], "rejected_attention_mask": attention[n:], "rejected_labels": labels[n:]}
    standin = trainer_standin(alpha=0.0, loss_type="simpo", beta=beta, simpo_gamma=gamma, label_smoothing=smoothing,
                              cpo_alpha=cpo_alpha, is_encoder_decoder=False, pad_token_id=0,
                              concatenated_inputs=CPOTrainer.concatenated_inputs,
                              get_batch_logps=CPOTrainer.get_batch_logps)
    standin.cpo_loss = types.MethodType(CPOTrainer.cpo_loss, standin)
    standin.concatenated_forward = types.MethodType(CPOTrainer.concatenated_forward, standin)
    model = lambda input_ids, attention_mask, **_: types.SimpleNamespace(  # noqa: E731
        logits=plain_logits(policy, input_ids, attention_mask))
    theirs, metrics = CPOTrainer.get_batch_loss_metrics(standin, model, batch)
    theirs_grads = torch.autograd.grad(theirs, list(policy.parameters()))

    settings = PreferenceSettings("simpo", beta=beta, simpo_gamma=gamma, label_smoothing=smoothing,
                                  rpo_alpha=cpo_alpha)
    out = preference_loss(settings, *lmforge_logps(policy, pairs))
    ours_grads = torch.autograd.grad(out.loss, list(policy.parameters()))
    assert out.loss.item() == pytest.approx(theirs.item(), abs=TOL)
    for (name, _), a, b in zip(policy.named_parameters(), ours_grads, theirs_grads, strict=True):
        assert (a - b).abs().max() < TOL, name
    check_metrics(out.metrics, metrics)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_orpo_matches_trl_odds_ratio_loss_plus_answer_nll(models, pairs, beta):
    policy, _ = models
    with torch.no_grad():
        sums_c, sums_r, tokens_c, tokens_r = lmforge_logps(policy, pairs)
    chosen, rejected = sums_c.clone().requires_grad_(), sums_r.clone().requires_grad_()
    standin = trainer_standin(beta=beta)
    ratio_losses, rewards_c, rewards_r, *_ = ORPOTrainer.odds_ratio_loss(standin, chosen / tokens_c,
                                                                         rejected / tokens_r)
    nll = -(chosen.sum() / tokens_c.sum())  # TRL's NLL term, restricted to the answer (see the module docstring)
    theirs = nll - ratio_losses.mean()
    theirs_grads = torch.autograd.grad(theirs, [chosen, rejected])

    chosen, rejected = sums_c.clone().requires_grad_(), sums_r.clone().requires_grad_()
    out = preference_loss(PreferenceSettings("orpo", beta=beta), chosen, rejected, tokens_c, tokens_r)
    ours_grads = torch.autograd.grad(out.loss, [chosen, rejected])
    assert out.loss.item() == pytest.approx(theirs.item(), abs=TOL)
    assert all((a - b).abs().max() < TOL for a, b in zip(ours_grads, theirs_grads, strict=True))
    assert torch.allclose(out.losses, -ratio_losses, atol=TOL)
    assert out.metrics["rewards/chosen"].item() == pytest.approx(rewards_c.mean().item(), abs=TOL)
    assert out.metrics["rewards/rejected"].item() == pytest.approx(rewards_r.mean().item(), abs=TOL)


def test_orpo_parameter_gradients_through_packed_batch(models, pairs):
    """TRL's odds_ratio_loss on TRL's own length-averaged log-probs (CPOTrainer.get_batch_logps, shared by ORPO)
    plus torch's cross-entropy of the chosen answers, against lmforge through sequence_logps."""
    policy, _ = models
    ids, attention, completion = padded(pairs)
    labels = ids.masked_fill(completion == 0, IGNORE_INDEX)
    n = len(pairs)
    logits = plain_logits(policy, ids, attention)
    averaged = ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
    ratio_losses, *_ = ORPOTrainer.odds_ratio_loss(trainer_standin(beta=0.2), averaged[:n], averaged[n:])
    nll = F.cross_entropy(logits[:n, :-1].reshape(-1, VOCAB), labels[:n, 1:].reshape(-1))
    theirs_grads = torch.autograd.grad(nll - ratio_losses.mean(), list(policy.parameters()))

    out = preference_loss(PreferenceSettings("orpo", beta=0.2), *lmforge_logps(policy, pairs))
    ours_grads = torch.autograd.grad(out.loss, list(policy.parameters()))
    for (name, _), a, b in zip(policy.named_parameters(), ours_grads, theirs_grads, strict=True):
        assert (a - b).abs().max() < TOL, name


def test_orpo_nll_is_torch_cross_entropy_of_the_chosen_answers(models, pairs):
    policy, _ = models
    ids, attention, completion = padded(pairs)
    labels = ids.masked_fill(completion == 0, IGNORE_INDEX)
    n = len(pairs)
    logits = plain_logits(policy, ids[:n], attention[:n])
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:n, 1:].reshape(-1))
    with torch.no_grad():
        out = preference_loss(PreferenceSettings("orpo"), *lmforge_logps(policy, pairs))
    assert (out.loss - out.losses.mean()).item() == pytest.approx(expected.item(), abs=TOL)


@pytest.mark.parametrize("beta,desirable_weight,undesirable_weight", [(0.1, 1.0, 1.0), (0.5, 1.33, 0.8)])
def test_kto_matches_trl(models, pairs, beta, desirable_weight, undesirable_weight):
    policy, reference = models
    ids, attention, completion = padded(pairs)  # rows as unpaired completions: 3 desirable, 3 undesirable
    label = torch.tensor([True, False, True, False, True, False])
    kl_ids = ids.roll(1, 0)  # mismatched pairs stand-in: another row's tokens, so KL log-probs differ from the rows'
    kl_attention, kl_completion = attention.roll(1, 0), completion.roll(1, 0)
    labels = ids.masked_fill(completion == 0, IGNORE_INDEX)
    kl_labels = kl_ids.masked_fill(kl_completion == 0, IGNORE_INDEX)
    with torch.no_grad():
        ref_logps = plain_token_logps(reference, ids, attention, labels).sum(1)
        ref_kl = plain_token_logps(reference, kl_ids, kl_attention, kl_labels).sum(1)
        kl_logps = plain_token_logps(policy, kl_ids, kl_attention, kl_labels).sum(1)
    for shift in (0.0, -0.5):  # a negative KL estimate is clamped to 0 by both
        standin = trainer_standin(calculate_KL=True, precompute_ref_logps=True, loss_type="kto", beta=beta,
                                  desirable_weight=desirable_weight, undesirable_weight=undesirable_weight)
        standin._compute_kl_logps = types.MethodType(KTOTrainer._compute_kl_logps, standin)
        inputs = {"input_ids": ids, "attention_mask": attention, "completion_mask": completion, "label": label,
                  "KL_input_ids": kl_ids, "KL_attention_mask": kl_attention, "KL_completion_mask": kl_completion,
                  "ref_logps": ref_logps, "ref_KL_logps": ref_kl + shift}
        model = fused_standin_model(lambda i, a, lab: plain_token_logps(policy, i, a, lab))
        theirs = KTOTrainer._compute_loss(standin, model, inputs, return_outputs=False)
        theirs_grads = torch.autograd.grad(theirs, list(policy.parameters()))
        metrics = {k: v[-1] for k, v in standin._metrics["train"].items()}

        logps, _ = rows_logps(policy, ids, attention, completion)
        settings = PreferenceSettings("kto", beta=beta, desirable_weight=desirable_weight,
                                      undesirable_weight=undesirable_weight)
        out = kto_loss(settings, logps, ref_logps, label, kl_logps, ref_kl + shift)
        ours_grads = torch.autograd.grad(out.loss, list(policy.parameters()))
        assert out.loss.item() == pytest.approx(theirs.item(), abs=TOL)
        for (name, _), a, b in zip(policy.named_parameters(), ours_grads, theirs_grads, strict=True):
            assert (a - b).abs().max() < TOL, name
        check_metrics(out.metrics, metrics)


def test_sequence_logps_equals_each_document_alone(models, pairs, monkeypatch):
    monkeypatch.setattr(preference, "CHUNK_ROWS", 3)
    policy, _ = models
    chosen, rejected, tokens_c, tokens_r = lmforge_logps(policy, pairs)
    for i, (prompt, *answers) in enumerate(pairs):
        for answer, got, count in zip(answers, (chosen[i], rejected[i]), (tokens_c[i], tokens_r[i]), strict=True):
            ids = torch.cat([prompt, answer])
            with torch.no_grad():
                full = policy.logits(policy(ids, torch.arange(len(ids)), AttnMeta.for_sequences([len(ids)])))
            logps = full.log_softmax(-1)[len(prompt) - 1:-1].gather(1, answer[:, None]).sum()
            assert got.item() == pytest.approx(logps.item(), abs=TOL)
            assert count.item() == len(answer)


def test_prompt_tokens_contribute_nothing(models, pairs):
    """Prompt positions are context only: no gradient reaches their hidden states through the head, and a batch
    with no answer tokens scores zero."""
    policy, _ = models
    ids, positions, labels, lens = packed(pairs)
    meta = AttnMeta.for_sequences(lens)
    hidden = policy(ids, positions, meta).detach().requires_grad_()
    logps, _ = sequence_logps(policy, hidden, labels, meta.cu_seqlens_q)
    (grad,) = torch.autograd.grad(logps.sum(), hidden)
    scored = labels != IGNORE_INDEX
    assert grad[~scored].abs().max() == 0 and (grad[scored].abs().sum(1) > 0).all()
    no_answers = torch.full_like(labels, IGNORE_INDEX)
    empty, counts = sequence_logps(policy, hidden, no_answers, meta.cu_seqlens_q)
    assert (empty == 0).all() and (counts == 0).all()
    with pytest.raises(ValueError, match="cu_seqlens covers"):
        sequence_logps(policy, hidden[:-1], labels[:-1], meta.cu_seqlens_q)


def test_settings_reject_what_they_would_ignore():
    with pytest.raises(ValueError, match="label_smoothing applies to the robust and simpo"):
        PreferenceSettings("sigmoid", label_smoothing=0.1)
    with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
        PreferenceSettings("robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="rpo_alpha does not apply to the orpo"):
        PreferenceSettings("orpo", rpo_alpha=1.0)
    with pytest.raises(ValueError, match="needs the reference model"):
        preference_loss(PreferenceSettings("sigmoid"), *torch.zeros(4, 2))
