"""lmforge.tokenizer.Tokenizer against transformers' tokenizer on the same files (transformers is the reference only).

Two real tokenizer families, no network: SmolLM2's byte-level BPE and a Llama-2-style SentencePiece BPE; the
builders and texts are in tests/tokenizer_refs.py, the smollm2_tokenizer_dir fixture in tests/unit/conftest.py.
"""

import json
import random

import pytest
from tokenizers import Tokenizer as Backend

from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer
from tests.tokenizer_refs import TEXTS, hf_tokenizer, llama_style_dir, llama_style_tokenizer_json, write_json

pytest.importorskip("transformers")


@pytest.fixture(scope="session", params=["smollm2", "llama_style"])
def pair(request, tmp_path_factory) -> tuple[Tokenizer, object]:
    """(lmforge tokenizer, transformers tokenizer) loaded from the same directory."""
    if request.param == "smollm2":
        path = request.getfixturevalue("smollm2_tokenizer_dir")
    else:
        path = llama_style_dir(tmp_path_factory.mktemp("llama_style"))
    return Tokenizer.from_dir(path), hf_tokenizer(path)


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches_transformers(pair, add_special_tokens):
    ours, hf = pair
    for text in TEXTS:
        assert ours.encode(text, add_special_tokens) == hf.encode(text, add_special_tokens=add_special_tokens), text
    batch = ours.encode_batch(TEXTS, add_special_tokens)
    assert batch == [ours.encode(t, add_special_tokens) for t in TEXTS]


def test_byte_fallback_is_exercised(tmp_path):
    ours = Tokenizer.from_dir(llama_style_dir(tmp_path))
    ids = ours.encode("한국어 🎉")  # characters outside the trained alphabet
    assert set(ids) & ours.byte_fallback_ids
    assert ours.decode(ids) == "한국어 🎉"


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_decode_matches_transformers(pair, skip_special_tokens):
    ours, hf = pair
    for text in TEXTS:
        ids = hf.encode(text)
        assert ours.decode(ids, skip_special_tokens) == hf.decode(ids, skip_special_tokens=skip_special_tokens), text
    # Arbitrary ids too, special tokens and broken UTF-8 included.
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(ours.vocab_size) for _ in range(rng.randint(1, 12))]
        assert ours.decode(ids, skip_special_tokens) == hf.decode(ids, skip_special_tokens=skip_special_tokens)


def test_special_tokens_match_transformers(pair):
    ours, hf = pair
    assert ours.vocab_size == len(hf)
    assert (ours.bos_token, ours.eos_token, ours.unk_token, ours.pad_token) == (
        hf.bos_token,
        hf.eos_token,
        hf.unk_token,
        hf.pad_token,
    )
    assert (ours.bos_token_id, ours.eos_token_id, ours.unk_token_id, ours.pad_token_id) == (
        hf.bos_token_id,
        hf.eos_token_id,
        hf.unk_token_id,
        hf.pad_token_id,
    )
    assert ours.all_special_ids == set(hf.all_special_ids) | {
        i for i, t in hf.added_tokens_decoder.items() if t.special
    }
    assert ours.add_bos_token == (hf.encode("")[:1] == [hf.bos_token_id])


def test_smollm2_special_tokens(smollm2_tokenizer_dir):
    ours = Tokenizer.from_dir(smollm2_tokenizer_dir)
    assert (ours.bos_token, ours.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert ours.eos_token_ids == {2}
    assert not ours.add_bos_token
    assert ours.encode("hi")[0] != ours.bos_token_id
    assert ours.byte_fallback_ids == frozenset()


def test_llama_style_adds_bos_and_strips_first_space(tmp_path):
    ours = Tokenizer.from_dir(llama_style_dir(tmp_path))
    ids = ours.encode("Hello world")
    assert ids[0] == ours.bos_token_id == 1 and ours.add_bos_token
    assert ours.encode("Hello world", add_special_tokens=False) == ids[1:]
    assert ours.decode(ids) == "Hello world"
    assert ours.decode(ids, skip_special_tokens=False) == "<s> Hello world"


def test_eos_token_ids_include_generation_config(tmp_path):
    path = llama_style_dir(tmp_path)
    write_json(path / "config.json", {"eos_token_id": 0})
    assert Tokenizer.from_dir(path).eos_token_ids == {0, 2}
    write_json(path / "generation_config.json", {"eos_token_id": [2, 5, 7]})  # takes priority over config.json
    assert Tokenizer.from_dir(path).eos_token_ids == {2, 5, 7}
    write_json(path / "generation_config.json", {"eos_token_id": "</s>"})
    with pytest.raises(LmforgeError, match="generation_config.json: eos_token_id must be an int or a list of ints"):
        Tokenizer.from_dir(path)


def test_configured_special_tokens_are_added_like_transformers(tmp_path):
    # A pad token missing from the vocab and extra special tokens: transformers adds them as special tokens.
    extra = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    path = llama_style_dir(
        tmp_path, pad_token={"content": "<pad>", "__type": "AddedToken"}, additional_special_tokens=extra
    )
    ours, hf = Tokenizer.from_dir(path), hf_tokenizer(path)
    text = "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|><pad><pad>"
    assert ours.encode(text) == hf.encode(text)
    base = Backend.from_str(llama_style_tokenizer_json()).get_vocab_size()
    assert ours.pad_token_id == hf.pad_token_id == base  # appended after the vocabulary, first of the four
    assert ours.vocab_size == len(hf) == base + 4
    assert ours.decode(ours.encode(text)) == hf.decode(hf.encode(text), skip_special_tokens=True) == "user\n\nhi"


def test_special_tokens_map_json_is_read(tmp_path):
    path = llama_style_dir(tmp_path)
    write_json(path / "special_tokens_map.json", {"pad_token": "</s>"})
    assert Tokenizer.from_dir(path).pad_token_id == hf_tokenizer(path).pad_token_id == 2


def test_add_bos_token_applies_only_without_post_processor(tmp_path):
    # transformers 5 ignores add_bos_token when tokenizer.json exists; we follow the file's post-processor, and use
    # the config only where the file has none (so old Llama directories keep their BOS, as transformers 4 did).
    path = llama_style_dir(tmp_path / "with_pp", add_bos_token=False)
    assert Tokenizer.from_dir(path).encode("hi")[0] == 1
    path = llama_style_dir(tmp_path / "without_pp", add_bos_token=True, add_eos_token=True)
    data = json.loads((path / "tokenizer.json").read_text())
    data["post_processor"] = None
    write_json(path / "tokenizer.json", data)
    ids = Tokenizer.from_dir(path).encode("hi")
    assert ids[0] == 1 and ids[-1] == 2
    write_json(path / "tokenizer_config.json", {"bos_token": "<s>", "eos_token": "</s>"})
    assert Tokenizer.from_dir(path).encode("hi")[0] != 1


def test_truncation_in_tokenizer_json_is_ignored(tmp_path):
    path = llama_style_dir(tmp_path)
    data = json.loads((path / "tokenizer.json").read_text())
    data["truncation"] = {"direction": "Right", "max_length": 3, "strategy": "LongestFirst", "stride": 0}
    write_json(path / "tokenizer.json", data)
    assert len(Tokenizer.from_dir(path).encode("The quick brown fox jumps over the lazy dog")) > 3


def test_load_errors(tmp_path):
    with pytest.raises(LmforgeError, match="has no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"")
    with pytest.raises(LmforgeError, match="only a SentencePiece tokenizer.model"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(LmforgeError, match="not a readable tokenizers file"):
        Tokenizer.from_dir(tmp_path)
    path = llama_style_dir(tmp_path / "bad_config")
    (path / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(LmforgeError, match="tokenizer_config.json is not valid JSON"):
        Tokenizer.from_dir(path)
    with pytest.raises(LmforgeError, match="can only encode a string"):
        Tokenizer.from_dir(llama_style_dir(tmp_path / "ok")).encode(["a"])
