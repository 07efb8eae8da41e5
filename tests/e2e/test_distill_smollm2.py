"""Distillation end to end on the real SmolLM2-135M-Instruct. The teacher is SmolLM2 with a pirate LoRA (the SFT
demo config, a few steps) merged in; the student is plain SmolLM2 with a fresh LoRA, distilled from it with the
shipped distill config on the pirate chats' responses at kd_ratio 1, so the labels' cross-entropy never reaches it:
whatever pirate it speaks it learned from the teacher's distributions. The held-out KL to the teacher falls, and the
student answers held-out questions in the teacher's style, which the base never does."""

import json
from pathlib import Path

import pytest

from lmforge import LLM, SamplingParams
from lmforge.config import load_config
from lmforge.train.recipes import sft
from lmforge.weights.merge import merge_to_dir
from tests.train_refs import metrics

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).parents[2]
TEACHER_SFT = ROOT / "configs" / "smollm2-135m-lora-cpu.yaml"
DEMO = ROOT / "configs" / "smollm2-135m-distill-cpu.yaml"
VALIDATION = ROOT / "configs" / "data" / "pirate_demo_val.jsonl"
PIRATE = {"arr", "arrr", "matey", "ahoy", "aye", "ye", "landlubber"}


def pirate_answers(model: str, questions: list[str]) -> list[str]:
    llm = LLM(model, dtype="float32", max_model_len=256)
    outputs = llm.chat([[{"role": "user", "content": q}] for q in questions],
                       SamplingParams(temperature=0, max_tokens=10))
    return [out.outputs[0].text for out in outputs]


def share(answers: list[str]) -> float:
    """The fraction of answers with a pirate word in them."""
    words = [{w.strip(".,!?;:'\"") for w in a.lower().split()} for a in answers]
    return sum(bool(w & PIRATE) for w in words) / len(answers)


def test_a_student_distilled_from_a_pirate_teacher_talks_like_a_pirate(smollm2_dir, tmp_path):
    # a few steps of two unpacked chats each: the first response token ("Arr") is what both runs must learn
    common = [f"model.path={smollm2_dir}", f"data.cache_dir={tmp_path / 'cache'}", "precision=fp32",
              "data.packing=false", "micro_batch_size=2", "batch_size=2", "max_steps=10", "optimizer.lr=3e-3",
              "scheduler.name=constant", "scheduler.warmup_steps=0", "checkpoint.every_steps=0", "eval.max_batches=4"]
    sft.main(load_config(TEACHER_SFT, [*common, f"output_dir={tmp_path / 'teacher_run'}", "eval.every_steps=0"]))
    teacher = tmp_path / "teacher"
    merge_to_dir(str(smollm2_dir), tmp_path / "teacher_run" / "final", teacher)

    run = tmp_path / "student_run"
    student = sft.main(load_config(DEMO, [*common, f"distill.teacher={teacher}", f"output_dir={run}",
                                          "eval.every_steps=5"]))
    records = metrics(run)
    kd = [r["val_kd_loss"] for r in records if "val_kd_loss" in r]
    train = [r for r in records if "kd_loss" in r and "val_loss" not in r]
    print(f"val_kd_loss {' -> '.join(f'{v:.3f}' for v in kd)}; train kd_loss {train[0]['kd_loss']:.3f} -> "
          f"{train[-1]['kd_loss']:.3f}, ce_loss {train[0]['ce_loss']:.3f} -> {train[-1]['ce_loss']:.3f}")
    assert len(kd) == 2 and kd[-1] < kd[0]

    merged = tmp_path / "student"
    merge_to_dir(str(smollm2_dir), student, merged)
    questions = [json.loads(line)["messages"][0]["content"] for line in VALIDATION.read_text().splitlines()][:8]
    base, taught, distilled = (pirate_answers(str(m), questions) for m in (smollm2_dir, teacher, merged))
    print(f"pirate answers: base {share(base):.0%}, teacher {share(taught):.0%}, student {share(distilled):.0%}")
    for q, t, s in zip(questions, taught, distilled, strict=True):
        print(f"{q!r}: teacher {t!r}, student {s!r}")
    assert share(base) == 0.0 and share(taught) >= 0.75 and share(distilled) >= 0.75
