"""The DPO demo, shortened, on the real SmolLM2-135M-Instruct: LoRA DPO with the shipped config on the pirate pairs
(pirate answers chosen over the model's own plain replies), then held-out preference accuracy and greedy answers
of the live adapter."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmforge import LLM, SamplingParams
from lmforge.models import build_model
from lmforge.tokenizer import Tokenizer
from lmforge.weights.peft import load_adapter

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).parents[2]
DEMO = ROOT / "configs" / "smollm2-135m-dpo-cpu.yaml"
VALIDATION = ROOT / "configs" / "data" / "pirate_pairs_val.jsonl"


def pirate_share(model_dir: Path, adapter: Path | None, questions: list[str]) -> float:
    model = build_model(model_dir, torch.float32)
    if adapter is not None:
        load_adapter(model, adapter)
    llm = LLM(model=model, tokenizer=Tokenizer.from_dir(model_dir))
    outputs = llm.chat([[{"role": "user", "content": q}] for q in questions],
                       SamplingParams(temperature=0, max_tokens=12))
    return sum(out.outputs[0].text.lstrip().startswith("Arr") for out in outputs) / len(questions)


@pytest.mark.longest
def test_dpo_demo_prefers_the_chosen_style_on_held_out_pairs(smollm2_dir, tmp_path):
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "lmforge", "train", str(DEMO), f"model.path={smollm2_dir}", f"output_dir={run}",
         "max_steps=7", "eval.every_steps=7", "checkpoint.every_steps=0", f"data.cache_dir={tmp_path / 'cache'}"],
        capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    held_out = [r for r in records if "val_loss" in r][-1]
    print(f"held-out pairs: accuracy {held_out['val_rewards/accuracies']:.0%}, margin "
          f"{held_out['val_rewards/margins']:.2f}")
    assert held_out["val_rewards/accuracies"] >= 0.9
    questions = [json.loads(line)["prompt"] for line in VALIDATION.read_text().splitlines()][:12]
    before, after = pirate_share(smollm2_dir, None, questions), pirate_share(smollm2_dir, run / "final", questions)
    print(f"greedy answers starting with 'Arr': {before:.0%} before, {after:.0%} after")
    assert before == 0.0 and after >= 0.75
