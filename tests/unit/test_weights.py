"""HF directory IO: round trips, sharding, .bin fallback, and the errors a damaged directory gives."""

import json

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.models import build_model
from lmforge.models.config import read_config
from lmforge.weights.hf_dir import save_model
from tests.tiny import TINY_LLAMA, tiny_model, write_config, write_tiny


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_load_save_load_is_bit_identical(tmp_path, dtype):
    first = build_model(write_tiny(tmp_path / "a", dtype=getattr(torch, dtype)), progress=False)
    save_model(first, read_config(tmp_path / "a"), tmp_path / "b", source_dir=tmp_path / "a")
    second = build_model(tmp_path / "b", progress=False)
    a, b = state(first), state(second)
    assert a.keys() == b.keys()
    assert all(a[k].dtype == getattr(torch, dtype) and torch.equal(a[k], b[k]) for k in a)


def test_sharded_save_writes_index_and_loads(tmp_path):
    model = tiny_model()
    save_model(model, TINY_LLAMA, tmp_path, max_shard_bytes=20_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((tmp_path / s).is_file() for s in shards)
    assert not (tmp_path / "model.safetensors").exists()
    loaded = build_model(tmp_path, progress=False)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())


def test_bin_fallback(tmp_path):
    model = tiny_model()
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    write_config(tmp_path, TINY_LLAMA)
    loaded = build_model(tmp_path, progress=False)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())


def test_dtype_cast_on_load(tmp_path):
    model = build_model(write_tiny(tmp_path), dtype="bfloat16", progress=False)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_tied_embeddings_share_one_tensor(tmp_path):
    model = build_model(write_tiny(tmp_path, {**TINY_LLAMA, "tie_word_embeddings": True}), progress=False)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("problem, message", [
    ("truncated", "not a readable safetensors file"),
    ("missing_tensor", "lacks 1 tensor"),
    ("wrong_shape", "has shape"),
    ("no_weights", "holds no weights"),
    ("missing_key", "lacks the required key 'hidden_size'"),
    ("unknown_arch", "unsupported architecture (GPT2LMHeadModel)"),
    ("bad_json", "is not valid JSON"),
    ("no_config", "has no config.json"),
])
def test_damaged_directories_fail_clearly(tmp_path, problem, message):
    write_tiny(tmp_path)
    weights = tmp_path / "model.safetensors"
    if problem == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif problem in ("missing_tensor", "wrong_shape"):
        from safetensors.torch import load_file, save_file
        tensors = load_file(weights)
        if problem == "missing_tensor":
            del tensors["model.norm.weight"]
        else:
            tensors["model.norm.weight"] = torch.ones(7)
        save_file(tensors, weights)
    elif problem == "no_weights":
        weights.unlink()
    elif problem == "missing_key":
        write_config(tmp_path, {k: v for k, v in TINY_LLAMA.items() if k != "hidden_size"})
    elif problem == "unknown_arch":
        write_config(tmp_path, {**TINY_LLAMA, "architectures": ["GPT2LMHeadModel"]})
    elif problem == "bad_json":
        (tmp_path / "config.json").write_text("{not json")
    elif problem == "no_config":
        (tmp_path / "config.json").unlink()
    with pytest.raises(LmforgeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_model(tmp_path, progress=False)


def test_unknown_dtype(tmp_path):
    with pytest.raises(LmforgeError, match="unknown dtype 'float8'"):
        build_model(write_tiny(tmp_path), dtype="float8", progress=False)


def test_unsupported_architecture_lists_supported(tmp_path):
    write_tiny(tmp_path)
    write_config(tmp_path, {**TINY_LLAMA, "architectures": ["FooForCausalLM"]})
    with pytest.raises(LmforgeError, match="supported: .*LlamaForCausalLM"):
        build_model(tmp_path, progress=False)
