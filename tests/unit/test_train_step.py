"""The training step's arithmetic: token-normalised accumulation, packing, the fused loss, schedules."""

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import TrainConfig
from lmforge.data import IGNORE_INDEX
from lmforge.layers.attention import AttnMeta
from lmforge.train import loss as loss_module
from lmforge.train.loss import token_loss_sum
from lmforge.train.optim import build_optimizer, build_scheduler
from lmforge.train.recipes.sft import train_step
from tests.tiny import TINY_LLAMA, tiny_model


@dataclass
class Batch:
    input_ids: torch.Tensor
    positions: torch.Tensor
    cu_seqlens: torch.Tensor
    labels: torch.Tensor
    prefix_lens: torch.Tensor | None = None

    @property
    def num_trained_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


def documents(lengths: list[int], seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(ids, labels) per document: labels are the next ids, a masked prompt of 2 tokens, the last one untrained."""
    g = torch.Generator().manual_seed(seed)
    docs = []
    for n in lengths:
        ids = torch.randint(0, TINY_LLAMA["vocab_size"], (n,), generator=g)
        labels = torch.cat([ids[1:], torch.tensor([IGNORE_INDEX])])
        labels[:2] = IGNORE_INDEX
        docs.append((ids, labels))
    return docs


def flat(docs) -> Batch:
    lens = [len(ids) for ids, _ in docs]
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    return Batch(torch.cat([d[0] for d in docs]), torch.cat([torch.arange(n) for n in lens]), cu,
                 torch.cat([d[1] for d in docs]))


def config(**kw) -> TrainConfig:
    return TrainConfig(data={"train": [{"path": "x", "format": "text"}]}, precision="fp32", max_grad_norm=None, **kw)


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


class KeepGrads(torch.optim.SGD):
    """An optimizer whose step records the gradients instead of changing anything."""

    def __init__(self, params):
        super().__init__(params, lr=0.0)
        self.seen = None

    def step(self, closure=None):
        self.seen = [p.grad.clone() for g in self.param_groups for p in g["params"]]


@pytest.mark.parametrize("dtype", [torch.float32])
def test_accumulation_equals_one_big_batch(dtype):
    docs = documents([5, 17, 9, 30, 3, 12, 21, 8])
    model = tiny_model().to(dtype)
    opt = KeepGrads(model.parameters())
    # k=4 micro-batches of b=2 documents of different lengths, vs one batch of all 8
    small_step, _ = train_step(model, [flat(docs[i:i + 2]) for i in range(0, 8, 2)], config(), opt, None)
    small = opt.seen
    big_step, _ = train_step(model, [flat(docs)], config(), opt, None)
    (loss_small, tokens_small), (loss_big, tokens_big) = [(s["loss"], s["tokens"]) for s in (small_step, big_step)]
    assert tokens_small == tokens_big == sum(int((lab != IGNORE_INDEX).sum()) for _, lab in docs)
    assert loss_small == pytest.approx(loss_big, abs=1e-6)
    for a, b in zip(small, opt.seen, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_accumulation_is_not_a_mean_of_micro_batch_means():
    """A window of one long and one short micro-batch: each trained token weighs the same."""
    docs = documents([40, 4])
    model = tiny_model()
    opt = KeepGrads(model.parameters())
    loss = train_step(model, [flat(docs[:1]), flat(docs[1:])], config(), opt, None)[0]["loss"]
    with torch.no_grad():
        sums = [token_loss_sum(model, model(b.input_ids, b.positions, AttnMeta.for_training(b.cu_seqlens)), b.labels)
                for b in (flat(docs[:1]), flat(docs[1:]))]
        counts = [flat(docs[:1]).num_trained_tokens, flat(docs[1:]).num_trained_tokens]
    assert loss == pytest.approx(float(sum(sums)) / sum(counts), rel=1e-6)
    assert loss != pytest.approx(float(sum(s / c for s, c in zip(sums, counts, strict=True))) / 2, rel=1e-3)


def test_packed_loss_equals_token_weighted_unpacked_loss():
    docs = documents([11, 26, 7, 19], seed=3)
    model = tiny_model()
    packed = flat(docs)
    with torch.no_grad():
        hidden = model(packed.input_ids, packed.positions, AttnMeta.for_training(packed.cu_seqlens))
        packed_loss = token_loss_sum(model, hidden, packed.labels) / packed.num_trained_tokens
        total, count = 0.0, 0
        for ids, labels in docs:  # each document alone, through plain cross-entropy on full logits
            logits = model.logits(model(ids, torch.arange(len(ids)), AttnMeta.for_sequences([len(ids)])))
            total += F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum").item()
            count += int((labels != IGNORE_INDEX).sum())
    assert float(packed_loss) == pytest.approx(total / count, abs=1e-5)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("spread", [1.0, 60.0])
def test_fused_loss_matches_autograd_cross_entropy(monkeypatch, tied, autocast, spread):
    """spread 60: logits hundreds apart, below the fused softmax's clamp at max - 80."""
    monkeypatch.setattr(loss_module, "CHUNK_ROWS", 7)  # several chunks, the last one partial
    model = tiny_model({**TINY_LLAMA, "tie_word_embeddings": tied})
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    with torch.no_grad():
        model.lm_head.weight.mul_(spread)
    batch = flat(documents([12, 20], seed=5))
    results = []
    for fused in (True, False):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            hidden = model(batch.input_ids, batch.positions, AttnMeta.for_training(batch.cu_seqlens))
            if fused:
                total = token_loss_sum(model, hidden, batch.labels)
            else:
                total = F.cross_entropy(model.logits(hidden), batch.labels, ignore_index=IGNORE_INDEX, reduction="sum")
        (total / 10).backward()
        results.append((total.item(), grads(model)))
    (fused_loss, fused_grads), (ref_loss, ref_grads) = results
    tol = 2e-2 if autocast else 1e-5
    assert fused_loss == pytest.approx(ref_loss, rel=tol / 10)
    for name, ref in ref_grads.items():
        torch.testing.assert_close(fused_grads[name], ref, atol=tol * ref.abs().max().item(), rtol=tol)


def test_schedules():
    p = torch.nn.Parameter(torch.zeros(2, 2))
    model = torch.nn.Module()
    model.p = p
    cfg = config(optimizer={"lr": 1.0}, scheduler={"name": "cosine", "warmup_steps": 4, "min_lr_ratio": 0.1})
    opt = build_optimizer(model, cfg.optimizer)
    sched = build_scheduler(opt, cfg.scheduler, total_steps=14)
    lrs = []
    for _ in range(14):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8]) and lrs[4] == pytest.approx(1.0)
    assert lrs[9] == pytest.approx(0.1 + 0.9 * 0.5) and min(lrs) >= 0.1
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:], strict=False))
    linear = build_scheduler(build_optimizer(model, cfg.optimizer), cfg.scheduler.model_copy(
        update={"name": "linear", "warmup_steps": 0, "min_lr_ratio": 0.0}), total_steps=10)
    assert linear.get_last_lr()[0] == pytest.approx(1.0)


def test_optimizer_skips_decay_on_vectors_and_refuses_nothing_to_train():
    model = tiny_model()
    opt = build_optimizer(model, config(optimizer={"weight_decay": 0.1}).optimizer)
    decayed, plain = opt.param_groups
    assert all(p.dim() >= 2 for p in decayed["params"]) and decayed["weight_decay"] == 0.1
    assert all(p.dim() == 1 for p in plain["params"]) and plain["weight_decay"] == 0.0
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to train"):
        build_optimizer(model, config().optimizer)
