"""The preference recipe (`recipe: dpo`) on a tiny random Llama with SmolLM2's tokenizer: a window's loss and
gradients equal one big batch's, the reference is the starting model, runs write TRL's metrics, bad configs are
refused in one sentence."""

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge import kernels
from lmforge.cli import main as cli_main
from lmforge.config import load_config
from lmforge.data import Loader, build_datasets
from lmforge.data.dataset import Document, PreferenceDataset
from lmforge.data.loader import make_batch
from lmforge.errors import LmforgeError
from lmforge.layers import train_kernels
from lmforge.layers.attention import AttnMeta
from lmforge.layers.linear import Linear
from lmforge.models import build_model
from lmforge.tokenizer import Tokenizer
from lmforge.train import dist
from lmforge.train.preference import sequence_logps
from lmforge.train.recipes import sft
from lmforge.train.recipes.dpo import METRICS, PreferenceObjective
from tests.train_refs import assert_window_equals_one_batch, build_run, config_maker, killed_and_resumed, metrics


@pytest.fixture
def make_config(tmp_path, tiny_chat_model):
    return config_maker(tmp_path, tiny_chat_model, slice(0, 24), slice(24, 30), pairs=True, micro_batch_size=2,
                        batch_size=4, max_steps=4, threads=2, eval__every_steps=2)


def _base_logps(model_dir: Path, batch) -> torch.Tensor:
    base = build_model(model_dir, "float32")
    with torch.no_grad():
        hidden = base(batch.input_ids, batch.positions, AttnMeta.for_training(batch.cu_seqlens, batch.prefix_lens))
        return sequence_logps(base, hidden, batch.labels, batch.cu_seqlens)[0]


@pytest.mark.parametrize("overrides", [{}, {"preference__loss": "ipo", "preference__rpo_alpha": 0.5},
                                       {"preference__loss": "orpo", "method": "full"},
                                       {"preference__loss": "robust", "preference__label_smoothing": 0.2,
                                        "method": "full"}])
def test_a_window_of_micro_batches_equals_one_big_batch(make_config, overrides):
    """Loss and every gradient of 4 pairs in 2 micro-batches equal those of the 4 pairs in one, for losses with
    and without a reference and with the NLL term (normalised by the window's chosen tokens)."""
    cfg, model, model_dir, data = build_run(make_config("w", data__shuffle=False, **overrides))
    with torch.no_grad():  # move the policy off the reference so that the loss has a gradient to compare
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)
    objective = PreferenceObjective(cfg, model, model_dir, torch.device("cpu"))
    joined, _, _ = assert_window_equals_one_batch(model, cfg, objective, data.train, {"loss", "tokens", *METRICS})


@pytest.mark.parametrize("method", ["lora", "full"])
def test_the_reference_is_the_starting_model(make_config, method):
    """Before any update DPO's loss is log 2 with zero rewards; the reference log-probs are the base model's own,
    bit for bit (adapters off under LoRA, the frozen copy in full runs), and stay so after updates."""
    cfg, model, model_dir, data = build_run(make_config("r", method=method, optimizer__lr=1e-2))
    objective = PreferenceObjective(cfg, model, model_dir, torch.device("cpu"))
    assert (objective.reference is None) == (method == "lora")
    batches = iter(Loader(data.train, 2, shuffle=False))
    batch, other = next(batches), next(batches)
    base = _base_logps(model_dir, batch)
    assert torch.equal(objective._reference_logps(batch), base)
    objective.totals([other, batch])  # one reference pass over both, each batch's share kept for loss()
    torch.testing.assert_close(objective._references[id(batch)], base, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(objective._references[id(other)], _base_logps(model_dir, other), rtol=1e-5, atol=1e-4)
    totals = objective.totals([batch])
    loss, stats = objective.loss(model, batch, totals)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert stats["rewards/margins"] == pytest.approx(0, abs=1e-5)  # float32 sums of ~-300 differ by ~1e-5
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sft.train_step(model, [batch], cfg, optimizer, None, objective=objective)
    assert torch.equal(objective._reference_logps(batch), base)
    assert objective.loss(model, batch, totals)[0].item() != pytest.approx(math.log(2), abs=1e-4)


def test_full_runs_precompute_the_reference_and_free_it(make_config):
    """Full fine-tuning looks the reference log-probs up from a table computed before training (every training and
    validation pair, TRL's precompute_ref_log_probs) and frees the frozen copy: the values are the base model's, a
    pair that is not in the table is an error, and a run gives the losses and metrics of one that keeps the copy."""
    cfg, model, model_dir, data = build_run(make_config("p", method="full"))
    objective = PreferenceObjective(cfg, model, model_dir, torch.device("cpu"))
    assert objective.precompute and objective.reference is not None
    objective.prepare(data, dist.SINGLE, torch.device("cpu"))
    assert objective.reference is None
    assert len(objective.table) == len(data.train) + len(data.validation)  # pairs, not packed rows
    for dataset in (data.train, data.validation):
        for batch in Loader(dataset, 2, shuffle=False):
            torch.testing.assert_close(objective._look_up(batch), _base_logps(model_dir, batch), rtol=1e-5,
                                       atol=1e-4)
    totals = objective.totals([batch])
    assert objective.loss(model, batch, totals)[0].item() == pytest.approx(math.log(2), abs=1e-6)
    changed = dataclasses.replace(batch, input_ids=batch.input_ids.flip(0))
    with pytest.raises(RuntimeError, match="missing from the precomputed reference"):
        objective._look_up(changed)

    runs = {}
    for precompute in (True, False):
        cfg = load_config(make_config(f"run-{precompute}", method="full",
                                      preference__precompute_ref_log_probs=precompute))
        runs[precompute] = metrics(sft.main(cfg).parent)
    for a, b in zip(runs[True], runs[False], strict=True):
        for name in [n for n in a if n.removeprefix("val_") in ("loss", *METRICS)]:
            assert a[name] == pytest.approx(b[name], abs=1e-5), (a["step"], name)


def test_lora_bf16_packs_the_frozen_base_and_keeps_the_loss(make_config, monkeypatch):
    """bf16 LoRA DPO on an AVX512-BF16 CPU without AMX runs its frozen base and head on packed copies
    (layers/linear.py frozen_packs) in the policy's forward and the reference pass; loss, metrics and adapter
    gradients equal those of the unpacked path within bf16 rounding. Elsewhere nothing is packed."""
    cfg, model, model_dir, data = build_run(make_config("b", precision="bf16-mixed", data__shuffle=False))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)
    objective = PreferenceObjective(cfg, model, model_dir, torch.device("cpu"))
    ops = kernels.cpu_ops()
    if ops is None or not ops.vnni_available() or ops.amx_available():
        assert objective.packs is None
        return
    batch = next(iter(Loader(data.train, 2, shuffle=False)))
    params = [p for p in model.parameters() if p.requires_grad]
    packs, results, products = objective.packs, [], []
    packed_linear = train_kernels.packed_linear
    monkeypatch.setattr(train_kernels, "packed_linear", lambda *args: products.append(1) or packed_linear(*args))
    for objective.packs in (packs, None):
        with sft.autocast(cfg, torch.device("cpu")):
            loss, stats = objective.loss(model, batch, objective.totals([batch]))
        results.append((stats, torch.autograd.grad(loss, params)))
    (packed, grads), (plain, plain_grads) = results
    frozen = [m for m in model.modules() if type(m) is Linear and not m.weight.requires_grad]
    assert model.lm_head in frozen and all(packs.packs[m]._packed[1] == "vnni" for m in frozen)  # the head too
    assert products  # under autograd too, not only in the reference pass
    assert packed["loss"] == pytest.approx(plain["loss"], abs=2e-2)
    for a, b in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0.05, atol=0.05 * b.abs().max().item())


@pytest.mark.parametrize("method", ["lora", "full"])
def test_the_shared_prompt_runs_once_and_changes_nothing(make_config, method, monkeypatch):
    """A pair's rejected answer attends to the chosen document's prompt instead of repeating it: fewer tokens
    through the model, and the loss, metrics and every gradient of two whole documents per pair."""
    cfg, model, model_dir, data = build_run(make_config("s", method=method, data__shuffle=False))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)
    objective = PreferenceObjective(cfg, model, model_dir, torch.device("cpu"))
    rows = np.arange(2)
    shared = make_batch(data.train, rows)
    monkeypatch.setattr(PreferenceDataset, "pair_documents", lambda self, i: (
        Document(*self.document(i, chosen=True)), Document(*self.document(i, chosen=False))))
    whole = make_batch(data.train, rows)
    assert whole.prefix_lens is None and shared.prefix_lens is not None
    pairs = len(whole.cu_seqlens) // 2
    assert shared.num_tokens == whole.num_tokens - int(shared.prefix_lens.sum()) < whole.num_tokens
    results = []
    for batch in (shared, whole):
        totals = objective.totals([batch])
        loss, stats = objective.loss(model, batch, totals)
        params = [p for p in model.parameters() if p.requires_grad]
        results.append((totals, stats, torch.autograd.grad(loss, params)))
    (totals_s, stats_s, grads_s), (totals_w, stats_w, grads_w) = results
    assert totals_s == totals_w and totals_s[0] == pairs
    assert stats_s == pytest.approx(stats_w, abs=1e-5)
    for a, b in zip(grads_s, grads_w, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_a_dpo_run_learns_the_pairs_and_writes_trl_metrics(tmp_path, tiny_chat_model):
    """Validated on its own training pairs, the run's margins grow and its loss falls below log 2."""
    make = config_maker(tmp_path, tiny_chat_model, slice(0, 16), slice(0, 16), pairs=True, micro_batch_size=2,
                        batch_size=4, threads=2)
    cfg = load_config(make("run", max_steps=8, optimizer__lr=5e-3, eval__every_steps=4, checkpoint__every_steps=4))
    final = sft.main(cfg)
    records = metrics(Path(cfg.output_dir))
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))
    assert all(name in r for r in steps for name in METRICS) and all(r["tokens"] > 0 for r in steps)
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # the policy starts as the reference
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [4, 8]
    assert 0 < evals[0]["val_rewards/margins"] < evals[1]["val_rewards/margins"]
    assert evals[1]["val_loss"] < evals[0]["val_loss"] < math.log(2)
    assert (final / "adapter_config.json").is_file()
    # `lmforge eval` on the same pairs (reference: the adapter's base) reproduces the run's last validation
    out = tmp_path / "eval.json"
    assert cli_main(["-q", "eval", str(cfg.model.path), "--adapter", str(final), "--data", str(tmp_path / "val.jsonl"),
                     "--max-seq-len", str(cfg.data.max_seq_len), "--dtype", "float32", "--device", "cpu",
                     "-o", str(out)]) == 0
    scored = json.loads(out.read_text())
    assert scored["pairs"] == 16 and scored["reference"].endswith("(the adapter's base)")
    assert scored["preference_accuracy"] == pytest.approx(evals[1]["val_rewards/accuracies"], abs=1e-6)
    assert scored["mean_margin"] * cfg.preference.beta == pytest.approx(evals[1]["val_rewards/margins"], rel=1e-4)


@pytest.mark.parametrize(("overrides", "match"), [
    ({"recipe": "sft"}, "format: preference rows are pairs for recipe: dpo or reward, not sft"),
    ({"data__train": [{"path": "train.jsonl", "format": "messages"}]},
     "recipe dpo trains on preference pairs: every data source needs format: preference"),
    ({"preference__loss": "kto"}, "preference.loss"),
    ({"preference__beta": 0}, "preference.beta"),
    ({"preference__loss": "simpo", "preference__precompute_ref_log_probs": True},
     "precompute_ref_log_probs does not apply to loss: simpo"),
])
def test_bad_configs_are_one_sentence(make_config, overrides, match):
    with pytest.raises(LmforgeError, match=match):
        load_config(make_config("bad", **overrides))


def test_the_preference_section_belongs_to_dpo(make_config, tiny_chat_model, tmp_path):
    (tmp_path / "sft").mkdir()
    plain = config_maker(tmp_path / "sft", tiny_chat_model, slice(0, 4), slice(4, 6))
    with pytest.raises(LmforgeError, match="the preference section configures recipe: dpo, not sft"):
        load_config(plain("x", preference__beta=0.5))


def test_pairs_are_tokenised_with_the_prompt_untrained(make_config):
    cfg = load_config(make_config())
    tokenizer = Tokenizer.from_dir(cfg.model.path)
    pairs = build_datasets(cfg.data, tokenizer).train
    assert pairs.num_rows < len(pairs)  # packed: several pairs per row of 2 x max_seq_len
    tokens, labels = pairs.pairs.document(0, chosen=True)
    prompt = len(pairs.pairs.prompt[0])
    assert (labels[:prompt - 1] == -100).all() and labels[prompt - 1] == tokens[prompt]


def test_a_killed_dpo_run_resumes_with_the_same_losses(make_config):
    baseline, run = killed_and_resumed(make_config)
    want, got = metrics(baseline), metrics(run)
    for a, b in zip(want, got, strict=True):
        for name in [n for n in a if n.removeprefix("val_") in ("loss", *METRICS)]:
            assert b[name] == pytest.approx(a[name], abs=1e-6), (a["step"], name)


def test_eval_scores_preference_rows_with_a_reference_or_without(make_config, tmp_path, tiny_chat_model, capsys):
    """Without an adapter or --reference the reward is the mean token log-prob; --reference names another model;
    --reference on rows that are not pairs is refused."""
    cfg = load_config(make_config())
    pairs = str(tmp_path / "val.jsonl")
    args = ["--dtype", "float32", "--device", "cpu"]
    out = tmp_path / "alone.json"
    assert cli_main(["-q", "eval", str(tiny_chat_model), "--data", pairs, *args, "-o", str(out)]) == 0
    alone = json.loads(out.read_text())
    assert alone["reference"].startswith("none") and alone["pairs"] == 6
    out = tmp_path / "self.json"
    assert cli_main(["-q", "eval", str(tiny_chat_model), "--data", pairs, "--reference", str(tiny_chat_model),
                     *args, "-o", str(out)]) == 0
    assert json.loads(out.read_text())["mean_margin"] == 0.0  # a model against itself: no reward at all
    chats = tmp_path / "chats.jsonl"
    chats.write_text('{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Arr"}]}\n')
    assert cli_main(["-q", "eval", str(cfg.model.path), "--data", str(chats), "--reference", str(tiny_chat_model),
                     *args]) == 2
    assert "--reference applies to preference rows" in capsys.readouterr().err
