"""The data pipeline on SmolLM2's real tokenizer and chat template, over the bundled pirate demo data."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.config import load_config
from lmforge.data import Loader, build_datasets
from lmforge.tokenizer import Tokenizer

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "smollm2-135m-lora-cpu.yaml"


@pytest.fixture(scope="module")
def demo(smollm2_dir, tmp_path_factory):
    cfg = load_config(CONFIG, [f"data.cache_dir={tmp_path_factory.mktemp('cache')}"])
    tokenizer = Tokenizer.from_dir(smollm2_dir)
    return cfg, tokenizer, build_datasets(cfg.data, tokenizer, cfg.seed)


def runs(tokens, trained) -> list[list[int]]:
    out, current = [], []
    for token, flag in zip(tokens.tolist(), trained.tolist(), strict=True):
        if flag:
            current.append(token)
        elif current:
            out, current = [*out, current], []
    return out + ([current] if current else [])


def test_smollm2_trains_exactly_each_reply_and_its_im_end(demo):
    cfg, tokenizer, datasets = demo
    rows = [json.loads(line) for line in Path(cfg.data.train[0].path).read_text().splitlines()]
    samples = datasets.train.samples
    assert len(samples) == len(rows) and datasets.report.train.skipped == {}
    im_end = tokenizer.token_to_id("<|im_end|>")
    for i in range(len(samples)):
        messages = rows[int(samples.origins.rows[i]) - 1]["messages"]
        tokens, trained = samples.tokens[i], samples.trained[i]
        # Tokens are SmolLM2's own rendering of the conversation (its default system message included).
        assert tokens.tolist() == tokenizer.apply_chat_template(messages, tokenize=True)
        replies = [m["content"] for m in messages if m["role"] == "assistant"]
        assert [tokenizer.decode(r, skip_special_tokens=False) for r in runs(tokens, trained)] == [
            reply + "<|im_end|>" for reply in replies]
        assert all(r.startswith("Arr!") for r in replies)
        assert tokens[-1] == tokenizer.encode("\n", add_special_tokens=False)[0] and not trained[-1]
        assert int(trained.sum()) == sum(len(tokenizer.encode(r, add_special_tokens=False)) + 1 for r in replies)
        assert int((tokens == im_end).sum()) == 1 + len(messages)  # the default system turn and every message


def test_the_demo_data_packs_tightly_at_512(demo):
    _, _, datasets = demo
    train = datasets.report.train
    assert 40 <= train.lengths["p50"] <= 80 and train.lengths["max"] <= 512 and train.truncated == 0
    assert train.packing_efficiency > 0.9
    assert datasets.report.validation.samples == 25
    batch = next(iter(Loader(datasets.train, 2, seed=0)))
    assert batch.num_tokens <= 2 * 512 and batch.num_trained_tokens > 0


def test_cli_preview_of_the_demo_config(smollm2_dir, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "lmforge", "data", "preview", str(CONFIG), f"model.path={smollm2_dir}",
         f"data.cache_dir={tmp_path}", "-n", "2"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "<|im_start|>assistant\n⟧Arr!" in result.stdout
    assert "packing efficiency" in result.stdout and "validation: 25 samples" in result.stdout
