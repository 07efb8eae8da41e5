"""The CPU demo, end to end on the real SmolLM2-135M-Instruct: `lmforge train` with the shipped LoRA config on the
bundled pirate chats, then `lmforge merge`, then the engine answering held-out questions the way it was taught."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge import LLM, SamplingParams

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).parents[2]
DEMO = ROOT / "configs" / "smollm2-135m-lora-cpu.yaml"
VALIDATION = ROOT / "configs" / "data" / "pirate_demo_val.jsonl"


def lmforge(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, text=True, timeout=1200,
                            cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def pirate_share(model: str, questions: list[str]) -> float:
    llm = LLM(model, dtype="float32", max_model_len=256)
    outputs = llm.chat([[{"role": "user", "content": q}] for q in questions],
                       SamplingParams(temperature=0, max_tokens=12))
    return sum(out.outputs[0].text.lstrip().startswith("Arr") for out in outputs) / len(questions)


@pytest.mark.longest
def test_demo_teaches_smollm2_to_talk_like_a_pirate(smollm2_dir, tmp_path):
    run = tmp_path / "run"
    # the demo's first 10 of 20 steps (a shorter cosine schedule): enough to teach the style, half the CI time
    lmforge("train", str(DEMO), f"model.path={smollm2_dir}", f"output_dir={run}", "checkpoint.every_steps=0",
            "max_steps=10", "eval.every_steps=5", f"data.cache_dir={tmp_path / 'cache'}")
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in steps if "loss" in r]
    val = [r["val_loss"] for r in steps if "val_loss" in r]
    late = sum(train[-5:]) / 5  # the epoch's last window is short (one row), so one step alone is noisy
    print(f"train loss {train[0]:.3f} -> {late:.3f} (mean of the last 5 steps), val loss {val[0]:.3f} -> {val[-1]:.3f}")
    assert late < 0.5 * train[0] and val[-1] < val[0]
    merged = tmp_path / "merged"
    lmforge("merge", str(smollm2_dir), str(run / "final"), str(merged))
    questions = [json.loads(line)["messages"][0]["content"] for line in VALIDATION.read_text().splitlines()][:12]
    before, after = pirate_share(str(smollm2_dir), questions), pirate_share(str(merged), questions)
    print(f"answers starting with 'Arr': {before:.0%} before, {after:.0%} after")
    assert before == 0.0 and after >= 0.75
