"""KTO (`recipe: dpo`, `preference.loss: kto`) on unpaired rows, on a tiny random Llama with SmolLM2's tokenizer: the
rows and their KL documents, a window's loss equal to one big batch's (z0 from the whole window), the loss equal to
TRL's formula on separately built documents, runs writing TRL's metrics, resumption, and bad input refused in one
sentence."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.cli import main as cli_main
from lmforge.config import load_config
from lmforge.data import IGNORE_INDEX, KTODataset, Loader, build_datasets
from lmforge.errors import LmforgeError
from lmforge.layers.attention import AttnMeta
from lmforge.models import build_model
from lmforge.models.config import read_config
from lmforge.tokenizer import Tokenizer
from lmforge.train.plan import memory_plan
from lmforge.train.preference import PreferenceSettings, kto_loss, sequence_logps
from lmforge.train.recipes import sft
from lmforge.train.recipes.kto import KTOObjective, reference_point
from tests.train_refs import DEMO, assert_window_equals_one_batch, build_run, config_maker, killed_and_resumed, metrics

NAMES = {"loss", "tokens", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
         "logps/rejected"}


def unpaired_rows(chat_lines: list[str]) -> list[str]:
    """Demo chats as {"prompt", "completion", "label"} rows, two per question: its pirate answer (desirable) and
    the next question's answer (undesirable)."""
    chats = [json.loads(line)["messages"] for line in chat_lines]
    rows = []
    for i, chat in enumerate(chats):
        rows.append({"prompt": chat[0]["content"], "completion": chat[1]["content"], "label": True})
        rows.append({"prompt": chat[0]["content"], "completion": chats[(i + 1) % len(chats)][1]["content"],
                     "label": False})
    return [json.dumps(r) for r in rows]


def kto_maker(folder: Path, model: Path, train: slice, validation: slice, **defaults):
    """config_maker's configs over unpaired rows (format: kto) with preference.loss: kto."""
    make = config_maker(folder, model, slice(0, 0), slice(0, 0), pairs=True, **defaults)
    rows = unpaired_rows(DEMO.read_text().splitlines())
    (folder / "train.jsonl").write_text("\n".join(rows[train]) + "\n")
    (folder / "val.jsonl").write_text("\n".join(rows[validation]) + "\n")
    data = {"data__train": [{"path": "train.jsonl", "format": "kto"}],
            "data__validation": [{"path": "val.jsonl", "format": "kto"}], "preference__loss": "kto"}
    return lambda name="run", **overrides: make(name, **{**data, **overrides})


@pytest.fixture
def make_config(tmp_path, tiny_chat_model):
    return kto_maker(tmp_path, tiny_chat_model, slice(0, 24), slice(24, 30), micro_batch_size=2, batch_size=4,
                     max_steps=4, threads=1, eval__every_steps=2)


def _moved(model: torch.nn.Module, cfg, data, seed: int = 0) -> None:
    """Moves the policy off the reference, so that the loss has a gradient, and makes every completion likelier
    (a few SFT steps on the rows' documents), so that the KL documents' gap to the reference, z0, is positive."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.01)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for batch in list(Loader(data, 2, shuffle=False))[:3]:
        sft.train_step(model, [batch], cfg, optimizer, None)  # the default objective: SFT's token loss


def test_rows_are_a_trained_document_and_a_kl_document_with_another_prompts_completion(make_config):
    cfg = load_config(make_config())
    data = build_datasets(cfg.data, Tokenizer.from_dir(cfg.model.path)).train
    assert isinstance(data, KTODataset) and data.num_rows < len(data)  # packed, rows of 2 x max_seq_len
    rows = data.data
    assert list(rows.desirable[:4]) == [True, False, True, False]
    batch = next(iter(Loader(data, 1, shuffle=False)))
    samples = data.samples(np.zeros(1, dtype=np.int64))
    assert batch.desirable is not None and batch.desirable.tolist() == list(rows.desirable[samples])
    partners = data.kl_partners
    assert (partners != np.arange(len(rows))).all()
    # neighbours share their prompt (a desirable then an undesirable answer): the partner's prompt never does
    assert not any(np.array_equal(rows.prompt[i], rows.prompt[j]) for i, j in enumerate(partners))
    cu = batch.cu_seqlens.tolist()
    for k, i in enumerate(samples):
        for doc, completion_of in ((2 * k, i), (2 * k + 1, partners[i])):
            tokens = batch.input_ids[cu[doc]:cu[doc + 1]].numpy()
            want = np.concatenate([rows.prompt[i], rows.completion[completion_of]])
            assert np.array_equal(tokens, want), (i, doc)
            labels = batch.labels[cu[doc]:cu[doc + 1]]
            prompt = len(rows.prompt[i])
            assert (labels[:prompt - 1] == IGNORE_INDEX).all() and labels[prompt - 1] == tokens[prompt]
    assert data.lengths.max() <= data.row_len


@pytest.mark.parametrize("overrides", [{"preference__desirable_weight": 1.5, "preference__undesirable_weight": 0.5},
                                       {"method": "full"}])
def test_a_window_of_micro_batches_equals_one_big_batch(make_config, overrides):
    """Loss, metrics and every gradient of 4 packed rows in 4 micro-batches equal those of the 4 rows in one: z0
    is the whole window's, not each micro-batch's."""
    cfg, model, model_dir, data = build_run(make_config("w", data__shuffle=False, **overrides))
    objective = KTOObjective(cfg, model, model_dir, torch.device("cpu"))
    _moved(model, cfg, data.train)
    # kl is the difference of two sums of ~-500 (summed log-probs of the tiny model's near-uniform ~100-token
    # answers: float32 resolution ~3e-5), which a head that rounds by batch size may make differ by ~1e-6
    _, summary, _ = assert_window_equals_one_batch(model, cfg, objective, data.train, NAMES, abs_tol=1e-5)
    assert summary["kl"] > 0
    per_batch = [reference_point(objective.totals([b])) for b in Loader(data.train, 1, shuffle=False)]
    assert max(abs(kl - summary["kl"]) for kl in per_batch[:4]) > 1e-3  # each micro-batch alone has another z0


def test_a_bf16_policy_starts_as_its_reference(make_config):
    """bf16-mixed LoRA: the no-grad reference passes (adapters off) run the training step's kernels, not the
    inference ones (kernels.training_forward), so before any update the policy's log-probs are the reference's:
    z0 is 0 and the loss is KTO's 0.5 (on the inference kernels it was 0.4965 on SmolLM2)."""
    cfg, model, model_dir, data = build_run(make_config("b", precision="bf16-mixed", data__shuffle=False))
    objective = KTOObjective(cfg, model, model_dir, torch.device("cpu"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    window = list(Loader(data.train, 2, shuffle=False))[:2]
    result, _ = sft.train_step(model, window, cfg, optimizer, None, objective=objective)
    assert result["kl"] == 0
    assert result["loss"] == pytest.approx(0.5, abs=1e-6)


def test_the_loss_is_trls_on_separately_built_documents(make_config, tiny_chat_model):
    """The objective's loss and metrics on one batch equal kto_loss (parity-tested against TRL's KTOTrainer) on
    log-probs of each row's document and KL document run one at a time, policy and reference (the base model)."""
    cfg, model, model_dir, data = build_run(make_config("t", data__shuffle=False))
    objective = KTOObjective(cfg, model, model_dir, torch.device("cpu"))
    _moved(model, cfg, data.train, seed=1)
    batch = next(iter(Loader(data.train, 2, shuffle=False)))
    base = build_model(model_dir, "float32")
    rows = data.train.data
    samples = data.train.samples(np.arange(2))

    def logps(net, i: int, completion_of: int) -> torch.Tensor:
        tokens, labels = rows.document(i, completion_of, cfg.data.max_seq_len)[:2]
        ids = torch.from_numpy(tokens).long()
        cu = torch.tensor([0, len(ids)], dtype=torch.int32)
        hidden = net(ids, torch.arange(len(ids)), AttnMeta.for_training(cu))
        return sequence_logps(net, hidden, torch.from_numpy(labels), cu)[0][0]

    with torch.no_grad():
        policy = torch.stack([logps(model, i, i) for i in samples])
        reference = torch.stack([logps(base, i, i) for i in samples])
        kl = torch.stack([logps(model, i, data.train.kl_partners[i]) for i in samples])
        ref_kl = torch.stack([logps(base, i, data.train.kl_partners[i]) for i in samples])
        want = kto_loss(PreferenceSettings("kto", cfg.preference.beta), policy, reference,
                        torch.from_numpy(rows.desirable[samples]), kl, ref_kl)
        totals = objective.totals([batch])
        loss, stats = objective.loss(model, batch, totals)
    summary = objective.summary(stats, totals)
    assert summary["kl"] > 0
    assert loss.item() == pytest.approx(want.loss.item(), abs=1e-6)
    for name, value in want.metrics.items():
        assert summary[name] == pytest.approx(value.item(), rel=1e-6, abs=1e-5), name  # logps: sums of ~-250


def test_a_kto_run_learns_and_writes_trl_metrics(tmp_path, tiny_chat_model):
    """Validated on its own training rows, the margin grows from 0 and the loss falls from 0.5 (the policy starts
    as the reference: every row's term is 1 - sigmoid(0))."""
    make = kto_maker(tmp_path, tiny_chat_model, slice(0, 16), slice(0, 16), micro_batch_size=2, batch_size=4,
                     threads=1)
    cfg = load_config(make("run", max_steps=8, optimizer__lr=5e-3, eval__every_steps=4))
    final = sft.main(cfg)
    records = metrics(Path(cfg.output_dir))
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))
    assert all(NAMES <= r.keys() for r in steps)
    assert steps[0]["loss"] == pytest.approx(0.5, abs=1e-6) and steps[0]["kl"] == 0
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [4, 8]
    assert 0 < evals[0]["val_rewards/margins"] < evals[1]["val_rewards/margins"]
    assert evals[1]["val_loss"] < evals[0]["val_loss"] < 0.5
    assert (final / "adapter_config.json").is_file()


def test_a_killed_kto_run_resumes_with_the_same_losses(make_config):
    baseline, run = killed_and_resumed(make_config)
    want, got = metrics(baseline), metrics(run)
    for a, b in zip(want, got, strict=True):
        assert a.keys() == b.keys()
        for name in a.keys() & (NAMES - {"tokens"}):
            assert b[name] == pytest.approx(a[name], abs=1e-6), (a["step"], name)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_config_check_plans_rows_of_two_documents_and_the_full_reference(make_config, capsys, method):
    """A row holds a trained document and a KL document (2 x max_seq_len); a full run holds the reference copy."""
    path = make_config("plan", method=method)
    assert cli_main(["config", "check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "rows of at most 256 tokens" in out  # max_seq_len 128
    cfg = load_config(path)
    plan = memory_plan(cfg, read_config(cfg.model.path))
    assert plan.tokens_per_micro_batch == cfg.micro_batch_size * 2 * cfg.data.max_seq_len
    assert plan.reference_bytes == (plan.parameters * 4.0 if method == "full" else 0)
    assert ("reference model:" in out) == (method == "full")


@pytest.mark.parametrize(("overrides", "match"), [
    ({"data__train": [{"path": "train.jsonl", "format": "preference"}],
      "data__validation": [{"path": "val.jsonl", "format": "preference"}]},
     "preference.loss kto trains on unpaired rows: every data source needs format: kto"),
    ({"preference__loss": "sigmoid"},
     "format: kto rows are unpaired .* not recipe: dpo with loss: sigmoid"),
    ({"recipe": "sft", "preference__loss": "sigmoid"}, "format: kto rows are unpaired .* not recipe: sft"),
    ({"recipe": "reward", "preference__loss": "sigmoid"}, "format: kto rows are unpaired .* not recipe: reward"),
    ({"recipe": "distill", "distill__teacher": "x", "preference__loss": "sigmoid"},
     "format: kto rows are unpaired .* not recipe: distill"),
    ({"preference__loss": "sigmoid", "preference__desirable_weight": 2.0,
      "data__train": [{"path": "train.jsonl", "format": "preference"}],
      "data__validation": [{"path": "val.jsonl", "format": "preference"}]},
     "desirable_weight and undesirable_weight apply to loss: kto, not sigmoid"),
    ({"preference__rpo_alpha": 1.0}, "rpo_alpha does not apply to loss: kto"),
])
def test_bad_configs_are_one_sentence_exit_2_and_write_nothing(make_config, capsys, overrides, match):
    path = make_config("bad", **overrides)
    with pytest.raises(LmforgeError, match=match):
        load_config(path)
    assert cli_main(["train", str(path)]) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert not (path.parent / "bad").exists()


@pytest.mark.parametrize(("row", "detail"), [
    ({"prompt": "Hi"}, "no 'completion' column"),
    ({"prompt": "Hi", "completion": "  ", "label": True}, "'completion' is empty"),
    ({"prompt": "Hi", "completion": [{"role": "assistant", "content": ""}], "label": False},
     "'completion' is an assistant message with no content"),
    ({"prompt": "Hi", "completion": "Arr", "label": "yes"}, "'label' must be true (desirable) or false"),
    ({"prompt": "Hi", "completion": "Arr"}, "'label' must be true (desirable) or false (undesirable), got missing"),
    ({"prompt": [{"role": "assistant", "content": "x"}], "completion": "Arr", "label": True},
     "'prompt' must end with a user message"),
])
def test_a_malformed_row_names_file_and_row(make_config, tmp_path, capsys, row, detail):
    good = {"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Arr"}],
            "label": True}
    (tmp_path / "train.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    path = make_config("strict", data__strict=True)
    assert cli_main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "train.jsonl:2: " in err and detail in err and "Traceback" not in err
    assert not (tmp_path / "strict").exists()


def test_data_preview_shows_prompt_completion_and_label(make_config, capsys):
    assert cli_main(["data", "preview", str(make_config()), "-n", "2", "--color", "never"]) == 0
    out = capsys.readouterr().out
    assert "── row 1 (" in out and "label true (desirable)" in out and "label false (undesirable)" in out
    assert out.count("── completion: ") == 2



def test_eval_refuses_kto_rows_in_one_sentence(tmp_path, tiny_chat_model, make_config, capsys):
    make_config()
    assert cli_main(["eval", str(tiny_chat_model), "--data", str(tmp_path / "val.jsonl"), "--device", "cpu"]) == 2
    assert "unpaired (kto) rows (prompt, completion, label) are not scored by lmforge eval" in capsys.readouterr().err
