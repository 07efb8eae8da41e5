"""`lmforge eval` on the real SmolLM2-135M-Instruct: easy questions are answered (the answer appears in the reply)."""

import json
import math

import pytest

from lmforge.cli import main as cli_main

pytestmark = pytest.mark.e2e

EASY = [("What is the capital of France?", ["Paris"]), ("What is the capital of Japan?", ["Tokyo"]),
        ("What color is the sky on a clear day?", ["blue"]), ("Who wrote Romeo and Juliet?", ["Shakespeare"]),
        ("What is the chemical symbol for water?", ["H2O"]), ("How many days are in a week?", ["seven", "7"])]


def test_eval_answers_easy_questions(smollm2_dir, tmp_path, capsys):
    data = tmp_path / "easy.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answers": a}) + "\n" for q, a in EASY))
    out = tmp_path / "results.json"
    # bfloat16: the CPU kernels' fast path, which keeps the test short
    assert cli_main(["-q", "eval", str(smollm2_dir), "--data", str(data), "--max-tokens", "24", "--device", "cpu",
                     "--dtype", "bfloat16", "--kv-cache-memory", "0.1", "-o", str(out)]) == 0
    qa = json.loads(out.read_text())["qa"]
    replies = [p["prediction"] for p in qa["predictions"]]
    assert qa["total"] == len(EASY) and qa["contains_count"] >= 5, replies
    assert "Paris" in replies[0]
    assert f"contains {qa['contains_count']}/{len(EASY)}" in capsys.readouterr().out
    results = json.loads(out.read_text())
    assert results["tokens"] > len(EASY) and math.isfinite(results["loss"]) and results["samples"] == len(EASY)
