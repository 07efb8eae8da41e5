"""The KTO demo, shortened, on the real SmolLM2-135M-Instruct: LoRA KTO with the shipped config on the unpaired
pirate rows (pirate answers desirable, the model's own plain replies undesirable); the held-out rows' rewards
separate: desirable answers gain reward over the reference, undesirable ones lose it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).parents[2]
DEMO = ROOT / "configs" / "smollm2-135m-kto-cpu.yaml"


def test_kto_demo_separates_held_out_desirable_and_undesirable_answers(smollm2_dir, tmp_path):
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "lmforge", "train", str(DEMO), f"model.path={smollm2_dir}", f"output_dir={run}",
         "max_steps=3", "batch_size=1", "data.max_seq_len=128", "eval.every_steps=3", "eval.max_batches=4",
         "checkpoint.every_steps=0", f"data.cache_dir={tmp_path / 'cache'}"],
        capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    held_out = [r for r in records if "val_loss" in r][-1]
    print(f"held-out rows: rewards chosen {held_out['val_rewards/chosen']:.3f}, rejected "
          f"{held_out['val_rewards/rejected']:.3f}, margin {held_out['val_rewards/margins']:.3f}, "
          f"loss {held_out['val_loss']:.4f}")
    assert records[0]["loss"] == pytest.approx(0.5, abs=1e-6)  # the policy starts as its reference
    assert held_out["val_rewards/chosen"] > 0 > held_out["val_rewards/rejected"]
    assert held_out["val_rewards/margins"] > 0.5 and held_out["val_loss"] < 0.45
