"""The distillation recipe (`recipe: distill`) on tiny random Llamas with SmolLM2's tokenizer: the teacher is another
tiny model (other sizes, same vocabulary). A window's loss and gradients equal one big batch's, runs write kd/ce
metrics and learn the teacher, a teacher with another vocabulary is refused before anything is written, a killed
run resumes with the same losses, bad configs are one sentence."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from lmforge.cli import main as cli
from lmforge.config import load_config
from lmforge.data import Loader, build_datasets
from lmforge.errors import LmforgeError
from lmforge.layers.attention import AttnMeta
from lmforge.models import build_model
from lmforge.models.config import read_config
from lmforge.train.distill import DistillSettings, distill_loss_sum
from lmforge.train.model import build_trainable
from lmforge.train.plan import memory_plan
from lmforge.train.recipes import sft
from lmforge.train.recipes.distill import DistillObjective
from tests.tiny import TINY_LLAMA, write_tiny
from tests.train_refs import assert_window_equals_one_batch, config_maker, metrics, train_until_killed
from tests.unit.test_train_distributed import assert_two_processes_match_one

STATS = {"loss", "kd_loss", "ce_loss", "tokens"}


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory, tiny_chat_model) -> Path:
    """A tiny random Llama of other sizes (wider, one layer more) with SmolLM2's vocabulary and tokenizer."""
    path = tmp_path_factory.mktemp("tiny_teacher")
    torch.manual_seed(1)
    write_tiny(path, {**TINY_LLAMA, "vocab_size": 49152, "max_position_embeddings": 512, "hidden_size": 48,
                      "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4})
    for file in tiny_chat_model.iterdir():
        if file.name.startswith(("tokenizer", "special_tokens", "chat_template", "vocab", "merges")):
            shutil.copy2(file, path / file.name)
    return path


@pytest.fixture
def make_config(tmp_path, tiny_chat_model, tiny_teacher):
    return config_maker(tmp_path, tiny_chat_model, slice(0, 24), slice(24, 30), recipe="distill",
                        distill__teacher=str(tiny_teacher), micro_batch_size=2, batch_size=4, max_steps=4, threads=2,
                        eval__every_steps=2)


def _setup(path: Path):
    cfg = load_config(path)
    torch.manual_seed(cfg.seed)
    model, tokenizer, _ = build_trainable(cfg, torch.device("cpu"))
    data = build_datasets(cfg.data, tokenizer, cfg.seed)
    return cfg, model, DistillObjective(cfg, model, tokenizer, torch.device("cpu")), data


@pytest.mark.parametrize("overrides", [{}, {"distill__loss": "jsd", "distill__temperature": 2.0, "method": "full"},
                                       {"distill__loss": "reverse_kl", "distill__kd_ratio": 1.0},
                                       {"method": "qlora"}])
def test_a_window_of_micro_batches_equals_one_big_batch(make_config, overrides):
    """Loss, kd/ce metrics and every gradient of 4 rows in 4 micro-batches equal those of the 4 rows in one."""
    cfg, model, objective, data = _setup(make_config("w", data__shuffle=False, **overrides))
    with torch.no_grad():  # LoRA's B starts at zero: move off it so that every trained weight has a gradient
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)
    _, small, small_grads = assert_window_equals_one_batch(model, cfg, objective, data.train, STATS)
    assert small["kd_loss"] > 0 and small["ce_loss"] > 0
    assert any(g.abs().sum() > 0 for g in small_grads)


def test_the_loss_is_the_teachers_divergence_and_the_students_cross_entropy(make_config):
    """The objective's micro-batch loss is distill_loss_sum on the two models' own forwards, mixed and divided by
    the window's trained tokens; the teacher is frozen and gets no gradient."""
    cfg, model, objective, data = _setup(make_config("m", distill__kd_ratio=0.3))
    assert all(not p.requires_grad for p in objective.teacher.parameters()) and not objective.teacher.training
    batch = next(iter(Loader(data.train, 2, shuffle=False)))
    totals = objective.totals([batch])
    assert totals == [batch.num_trained_tokens]
    loss, stats = objective.loss(model, batch, totals)
    meta = AttnMeta.for_training(batch.cu_seqlens)
    with torch.no_grad():
        kd, ce = distill_loss_sum(model, model(batch.input_ids, batch.positions, meta), objective.teacher,
                                  objective.teacher(batch.input_ids, batch.positions, meta), batch.labels,
                                  DistillSettings("forward_kl", 0.5, 1.0, 0.3))
    assert stats == pytest.approx({"kd_loss": kd.item(), "ce_loss": ce.item()}, rel=1e-6)
    assert loss.item() == pytest.approx((0.3 * kd.item() + 0.7 * ce.item()) / totals[0], rel=1e-6)


@pytest.mark.parametrize(("precision", "teacher_dtype", "want"), [("fp32", "auto", torch.float32),
                                                                  ("bf16-mixed", "auto", torch.bfloat16),
                                                                  ("fp32", "float16", torch.float16)])
def test_the_teacher_is_stored_in_its_own_dtype(make_config, precision, teacher_dtype, want):
    cfg = load_config(make_config("d", precision=precision, distill__teacher_dtype=teacher_dtype))
    model, tokenizer, _ = build_trainable(cfg, torch.device("cpu"))
    teacher = DistillObjective(cfg, model, tokenizer, torch.device("cpu")).teacher
    assert {p.dtype for p in teacher.parameters()} == {want}


def test_config_check_plans_the_teacher(make_config, tiny_teacher, tmp_path, capsys):
    """The frozen teacher, whole on every process, in `config check`'s memory plan: its parameters at its dtype."""
    config = make_config("plan", precision="fp32")
    cfg = load_config(config)
    with_teacher = memory_plan(cfg, read_config(cfg.model.path), 1, read_config(tiny_teacher))
    without = memory_plan(cfg, read_config(cfg.model.path), 1)
    teacher = sum(p.numel() for p in build_model(tiny_teacher, "float32").parameters())
    assert with_teacher.teacher_bytes == teacher * 4 == with_teacher.total_bytes - without.total_bytes
    assert cli(["config", "check", str(config)]) == 0
    line = f"teacher model: {teacher * 4 / 2**30:.2f} GiB (distill: frozen, whole on every process)"
    assert line in capsys.readouterr().out
    gone = make_config("gone", distill__teacher=str(tmp_path / "nowhere"))
    assert cli(["config", "check", str(gone)]) == 0
    assert "memory plan without the teacher" in capsys.readouterr().out


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_distill_run_learns_the_teacher_and_writes_kd_metrics(tmp_path, tiny_chat_model, tiny_teacher, method):
    """Validated on held-out rows, the KL to the teacher (val_kd_loss) falls; every step logs loss, kd_loss, ce_loss."""
    make = config_maker(tmp_path, tiny_chat_model, slice(0, 16), slice(16, 24), recipe="distill",
                        distill__teacher=str(tiny_teacher), distill__kd_ratio=1.0, micro_batch_size=2, batch_size=4,
                        threads=2)
    cfg = load_config(make("run", method=method, max_steps=8, optimizer__lr=1e-2 if method == "lora" else 3e-3,
                           eval__every_steps=4, checkpoint__every_steps=4))
    final = sft.main(cfg)
    records = metrics(Path(cfg.output_dir))
    steps = [r for r in records if "loss" in r and "val_loss" not in r]
    assert [r["step"] for r in steps] == list(range(1, 9))
    assert all(STATS <= r.keys() and r["tokens"] > 0 for r in steps)
    assert all(r["loss"] == pytest.approx(r["kd_loss"], rel=1e-9) for r in steps)  # kd_ratio 1
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [4, 8]
    assert {"val_kd_loss", "val_ce_loss", "val_tokens"} <= evals[0].keys()
    assert evals[1]["val_kd_loss"] < evals[0]["val_kd_loss"]
    assert (final / ("adapter_config.json" if method == "lora" else "config.json")).is_file()


def _other_vocabulary(source: Path, target: Path) -> Path:
    """The teacher's files with two tokens of its tokenizer swapped."""
    shutil.copytree(source, target)
    spec = json.loads((target / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab["hello"], vocab["world"] = vocab["world"], vocab["hello"]
    (target / "tokenizer.json").write_text(json.dumps(spec))
    return target


def test_a_teacher_with_another_vocabulary_is_refused_before_anything_is_written(make_config, tiny_teacher,
                                                                                tmp_path, capsys):
    teacher = _other_vocabulary(tiny_teacher, tmp_path / "other_teacher")
    config = make_config("refused", distill__teacher=str(teacher))
    assert cli(["train", str(config)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # beside the INFO log
    assert len(errors) == 1 and errors[0].startswith("lmforge train: error: distill.teacher ")
    assert "'hello'" in errors[0] and "'world'" in errors[0]  # the first id that differs, both its tokens
    assert errors[0].endswith("distillation needs a teacher with the student's vocabulary")
    assert not (tmp_path / "refused").exists()


def test_a_killed_distill_run_resumes_with_the_same_losses(make_config):
    steps = 12
    common = {"max_steps": steps, "eval__every_steps": 0, "checkpoint__every_steps": 3, "lora__dropout": 0.1}
    baseline = load_config(make_config("baseline", **common))
    sft.main(baseline)
    killed = make_config("killed", **common)
    run = Path(load_config(killed).output_dir)
    done = train_until_killed(killed, run, 7)
    assert 7 <= done < steps
    sft.main(load_config(killed))  # resume: checkpoint.resume is auto
    want, got = metrics(Path(baseline.output_dir)), metrics(run)
    assert [r["step"] for r in got if "kd_loss" in r] == list(range(1, steps + 1))
    assert [r["step"] for r in got if "val_kd_loss" in r] == [steps]  # validation at the end
    for a, b in zip(want, got, strict=True):
        for name in ("loss", "kd_loss", "ce_loss") if "kd_loss" in a else ("val_loss", "val_kd_loss", "val_ce_loss"):
            assert b[name] == pytest.approx(a[name], abs=1e-6), (a["step"], name)


@pytest.mark.parametrize(("overrides", "match"), [
    ({"data__train": [{"path": "train.jsonl", "format": "preference"}]},
     "recipe distill trains on SFT-format data"),
    ({"distill__teacher": None}, "recipe distill needs a teacher"),
    ({"distill__loss": "kl"}, "distill.loss"),
    ({"distill__beta": 1.0}, "distill.beta"),
    ({"distill__kd_ratio": 1.5}, "distill.kd_ratio"),
    ({"distill__temperature": 0}, "distill.temperature"),
])
def test_bad_configs_are_one_sentence(make_config, overrides, match):
    with pytest.raises(LmforgeError, match=match):
        load_config(make_config("bad", **overrides))


def test_the_distill_section_belongs_to_distill(tmp_path, tiny_chat_model):
    plain = config_maker(tmp_path, tiny_chat_model, slice(0, 4), slice(4, 6))
    with pytest.raises(LmforgeError, match="the distill section configures recipe: distill, not sft"):
        load_config(plain("x", distill__kd_ratio=0.9))


@pytest.mark.parametrize(("strategy", "method"), [("ddp", "lora"), ("fsdp", "full")])
def test_distill_in_two_processes_reaches_the_single_process_losses(tmp_path, tiny_chat_model, tiny_teacher,
                                                                    strategy, method):
    """The teacher whole on each rank, the student under DDP or FSDP: the divergence and cross-entropy summed over
    both ranks' tokens give the single process's losses and validation metrics."""
    make = config_maker(tmp_path, tiny_chat_model, slice(0, 32), slice(32, 37), recipe="distill",
                        distill__teacher=str(tiny_teacher), method=method, data__packing=False, micro_batch_size=1,
                        batch_size=4, max_steps=4, threads=1, eval__every_steps=4, optimizer__lr=1e-3)
    assert_two_processes_match_one(make, strategy, ("loss", "kd_loss", "ce_loss", "val_"))
