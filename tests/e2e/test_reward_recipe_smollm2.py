"""The reward-model demo, end to end on the real SmolLM2-135M-Instruct: `lmforge train` with the shipped config
(shortened) on the pirate pairs, `lmforge eval` of final/ on the 25 held-out pairs (pairwise accuracy), and
transformers' AutoModelForSequenceClassification reproducing lmforge's scores from the saved directory (fp32)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmforge.layers.attention import AttnMeta
from lmforge.train.reward import load_reward_model

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).parents[2]
DEMO = ROOT / "configs" / "smollm2-135m-reward-cpu.yaml"
VALIDATION = ROOT / "configs" / "data" / "pirate_pairs_val.jsonl"
STEPS = 3
SEQ_LEN = 128


def lmforge(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, text=True, timeout=1200,
                            cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_reward_demo_learns_to_prefer_pirate_answers(smollm2_dir, tmp_path):
    """Three steps (12 rows of packed pairs) lift the held-out pairwise accuracy to >= 90 % and the mean margin
    well above the starting model's; the untrained head already ranks many pairs right, so the margin is what
    shows the training."""
    import transformers

    run = tmp_path / "run"
    lmforge("train", str(DEMO), f"model.path={smollm2_dir}", f"output_dir={run}", f"max_steps={STEPS}",
            "checkpoint.every_steps=0", "data.validation=[]", "precision=fp32", f"data.max_seq_len={SEQ_LEN}",
            f"data.cache_dir={tmp_path / 'cache'}")
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    out = tmp_path / "eval.json"
    lmforge("eval", str(run / "final"), "--data", str(VALIDATION), "--max-seq-len", str(SEQ_LEN), "--dtype",
            "float32", "-o", str(out))
    result = json.loads(out.read_text())
    print(f"train loss {steps[0]['loss']:.3f} -> {steps[-1]['loss']:.3f}, margin {steps[0]['margin']:.3f} (first "
          f"window, untrained) -> held-out {result['mean_margin']:.3f}, held-out accuracy "
          f"{result['correct']}/{result['pairs']}")
    assert result["pairs"] == 25 and result["preference_accuracy"] >= 0.9
    assert result["mean_margin"] > 2 * steps[0]["margin"]

    pairs = [json.loads(line) for line in VALIDATION.read_text().splitlines()][:3]
    tokenizer = transformers.AutoTokenizer.from_pretrained(run / "final")
    docs = [torch.tensor(tokenizer.apply_chat_template(
        [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p[answer]}], tokenize=True,
        return_dict=True)["input_ids"]) for p in pairs for answer in ("chosen", "rejected")]
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(run / "final", dtype=torch.float32).eval()
    ours_model = load_reward_model(run / "final", "float32")
    with torch.no_grad():
        theirs = torch.cat([hf(input_ids=d[None]).logits[:, 0] for d in docs])
        ours = ours_model(torch.cat(docs), torch.cat([torch.arange(len(d)) for d in docs]),
                          AttnMeta.for_sequences([len(d) for d in docs]))
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
