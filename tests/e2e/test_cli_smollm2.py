"""The CLI on the real model, as a user runs it (a subprocess with the console entry point)."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e


def lmforge(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmforge", *args], input=stdin, capture_output=True, text=True,
                          timeout=300)


def test_info_describes_smollm2(smollm2_dir):
    result = lmforge("info", "--json", str(smollm2_dir))
    assert result.returncode == 0, result.stderr
    facts = json.loads(result.stdout)
    assert facts["architecture"] == "LlamaForCausalLM"
    assert 134_000_000 < facts["parameters"] < 136_000_000
    assert facts["chat_template"] is True and facts["context_length"] == 8192 and facts["tied_embeddings"]


def test_generate_answers_a_chat_prompt(smollm2_dir):
    result = lmforge("generate", "--model", str(smollm2_dir), "--chat", "--max-tokens", "24",
                     "What is the capital of France?")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_chat_reads_turns_from_stdin(smollm2_dir):
    result = lmforge("chat", "--model", str(smollm2_dir), "--temperature", "0", "--max-tokens", "20",
                     stdin="What is the capital of France?\n/reset\nName a primary colour.\n/exit\n")
    assert result.returncode == 0, result.stderr
    replies = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(replies) >= 2 and "Paris" in replies[0]
