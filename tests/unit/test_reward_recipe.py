"""The reward-model recipe (`recipe: reward`) on a tiny random Llama with SmolLM2's tokenizer: a window's loss and
gradients equal one big batch's, the head trains in full beside LoRA, runs write TRL's metrics and sequence-
classification directories that transformers loads, a killed run resumes exactly, bad configs are refused."""

import json
import math
from pathlib import Path

import pytest
import torch

from lmforge.cli import main as cli_main
from lmforge.config import load_config
from lmforge.errors import LmforgeError
from lmforge.layers.attention import AttnMeta
from lmforge.layers.lora import lora_layers
from lmforge.train.recipes import sft
from lmforge.train.recipes.reward import METRICS, RewardObjective
from lmforge.train.reward import RewardModel, bradley_terry_loss, load_reward_model
from tests.train_refs import assert_window_equals_one_batch, build_run, config_maker, killed_and_resumed, metrics
from tests.unit.test_train_distributed import assert_two_processes_match_one


@pytest.fixture
def make_config(tmp_path, tiny_chat_model):
    return config_maker(tmp_path, tiny_chat_model, slice(0, 24), slice(24, 30), pairs=True, micro_batch_size=2,
                        batch_size=4, max_steps=4, threads=1, eval__every_steps=2, recipe="reward")


@pytest.mark.parametrize("overrides", [{}, {"reward__center_rewards_coefficient": 0.1}, {"method": "full"},
                                       {"method": "qlora"}])
def test_a_window_of_micro_batches_equals_one_big_batch(make_config, overrides):
    """Loss, metrics and every gradient of 4 pairs in 4 micro-batches equal those of the 4 pairs in one; the loss
    is the mean Bradley-Terry loss of the pairs' scores, computed here from a plain forward."""
    cfg, model, _, data = build_run(make_config("w", data__shuffle=False, **overrides))
    assert isinstance(model, RewardModel) and model.score.weight.requires_grad
    assert model.score.weight.dtype == torch.float32
    objective = RewardObjective(cfg, model)
    joined, summary, _ = assert_window_equals_one_batch(model, cfg, objective, data.train,
                                                        {"loss", "tokens", *METRICS})
    with torch.no_grad():
        scores = model(joined.input_ids, joined.positions, AttnMeta.for_training(joined.cu_seqlens, joined.prefix_lens))
    chosen, rejected = scores[0::2], scores[1::2]
    want = bradley_terry_loss(chosen, rejected, None, cfg.reward.center_rewards_coefficient).mean()
    assert summary["loss"] == pytest.approx(want.item(), rel=1e-5)
    assert summary["accuracy"] == pytest.approx((chosen > rejected).float().mean().item())
    assert summary["margin"] == pytest.approx((chosen - rejected).mean().item(), abs=1e-6)


def test_lora_adapts_the_trunk_and_trains_the_head_in_full(make_config):
    cfg, model, _, _ = build_run(make_config("l"))
    adapted = lora_layers(model)
    assert adapted and "score" not in adapted and all(path.startswith("model.layers.") for path in adapted)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "score.weight" in trained and all("lora_" in n for n in trained - {"score.weight"})


def test_a_reward_run_learns_and_saves_what_transformers_loads(tmp_path, tiny_chat_model):
    """Validated on its own training pairs the loss falls below log 2 (the e2e test on SmolLM2 checks that held-out
    accuracy reaches 90 %); final/ is a sequence-
    classification directory whose scores transformers reproduces and `lmforge eval` scores the same."""
    import transformers

    make = config_maker(tmp_path, tiny_chat_model, slice(0, 16), slice(0, 16), pairs=True, micro_batch_size=2,
                        batch_size=4, threads=1, recipe="reward")
    cfg = load_config(make("run", max_steps=12, optimizer__lr=1e-2, eval__every_steps=6, checkpoint__every_steps=6))
    final = sft.main(cfg)
    records = metrics(Path(cfg.output_dir))
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 13))
    assert all(name in r for r in steps for name in METRICS) and all(r["tokens"] > 0 for r in steps)
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [6, 12]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] < math.log(2)  # a tiny random trunk learns slowly
    run = Path(cfg.output_dir)
    for folder in (final, run / "best", run / "checkpoints" / "step-000006"):
        config = json.loads((folder / "config.json").read_text())
        assert config["architectures"] == ["LlamaForSequenceClassification"] and config["num_labels"] == 1

    ours_model = load_reward_model(final, "float32")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(final, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(final)
    texts = ["Ahoy, matey! The sea be calm.", "Plain words here, nothing more"]
    docs = [torch.tensor(tokenizer(t)["input_ids"]) for t in texts]
    with torch.no_grad():
        theirs = torch.cat([hf(input_ids=d[None]).logits[:, 0] for d in docs])
        ours = ours_model(torch.cat(docs), torch.cat([torch.arange(len(d)) for d in docs]),
                          AttnMeta.for_sequences([len(d) for d in docs]))
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)

    out = tmp_path / "eval.json"
    assert cli_main(["-q", "eval", str(final), "--data", str(tmp_path / "val.jsonl"), "--max-seq-len", "128",
                     "--dtype", "float32", "--device", "cpu", "-o", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["pairs"] == 16 and result["preference_accuracy"] == evals[-1]["val_accuracy"]
    margins = torch.tensor(result["chosen_rewards"]) - torch.tensor(result["rejected_rewards"])
    assert margins.mean().item() == pytest.approx(evals[-1]["val_margin"], abs=1e-4)


def test_a_killed_reward_run_resumes_with_the_same_losses(make_config):
    baseline, run = killed_and_resumed(make_config)
    want, got = metrics(baseline), metrics(run)
    assert [r["step"] for r in got if "val_loss" in r] == [12]  # validation at the end
    for a, b in zip(want, got, strict=True):
        for name in [n for n in a if n.removeprefix("val_") in ("loss", *METRICS)]:
            assert b[name] == pytest.approx(a[name], abs=1e-6), (a["step"], name)
    assert torch.equal(load_reward_model(run / "final").score.weight,
                       load_reward_model(baseline / "final").score.weight)


@pytest.mark.parametrize(("overrides", "match"), [
    ({"data__train": [{"path": "train.jsonl", "format": "messages"}]},
     "recipe reward trains on preference pairs: every data source needs format: preference"),
    ({"reward__center_rewards_coefficient": -1}, "reward.center_rewards_coefficient"),
    ({"reward__margin": 1}, "reward.margin"),
    ({"preference__beta": 0.5}, "the preference section configures recipe: dpo, not reward"),
])
def test_bad_configs_are_one_sentence(make_config, overrides, match):
    with pytest.raises(LmforgeError, match=match):
        load_config(make_config("bad", **overrides))


def test_the_reward_section_belongs_to_recipe_reward(make_config):
    with pytest.raises(LmforgeError, match="the reward section configures recipe: reward, not dpo"):
        load_config(make_config("x", recipe="dpo", reward__center_rewards_coefficient=0.1))


def test_fsdp_is_refused(make_config, tmp_path, capsys):
    assert cli_main(["-q", "train", str(make_config("n", distributed__strategy="fsdp")), "--nproc", "2"]) == 2
    assert "recipe reward trains in one process or several under distributed.strategy ddp" in capsys.readouterr().err
    assert not (tmp_path / "n").exists()


def test_reward_in_two_ddp_processes_reaches_the_single_process_losses(tmp_path, tiny_chat_model):
    """Head and trunk whole on each rank (strategy auto picks DDP for recipe reward): the Bradley-Terry terms and
    metrics summed over both ranks' pairs give the single process's losses and validation metrics, and rank 0
    saves the whole reward model."""
    make = config_maker(tmp_path, tiny_chat_model, slice(0, 32), slice(32, 37), pairs=True, recipe="reward",
                        data__packing=False, micro_batch_size=1, batch_size=4, max_steps=4, threads=1,
                        eval__every_steps=4, optimizer__lr=1e-3)
    assert_two_processes_match_one(make, "auto", ("loss", *METRICS, "val_"))
    assert (tmp_path / "auto" / "final" / "config.json").is_file()
