"""Helpers for the data pipeline tests (plain functions, no tests): a tiny byte-level BPE tokenizer directory with
the special tokens of the named templates, and writers for data files."""

import functools
import json
from pathlib import Path

from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, trainers

from lmforge.config.schema import DataConfig
from lmforge.tokenizer import Tokenizer

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>", "</s>", "<|begin_of_text|>", "<|start_header_id|>",
           "<|end_header_id|>", "<|eot_id|>"]
CORPUS = ["What is the capital of France? Paris is the capital of France.", "Arr! Ahoy matey, the sea be calm.",
          "system user assistant instruction input response", "Below is an instruction that describes a task."] * 8
# SmolLM2's template: ChatML with a default system message.
CHATML_WITH_SYSTEM = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@functools.cache
def tiny_tokenizer_json() -> str:
    tok = Backend(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok.to_str()


def tiny_tokenizer_dir(path: Path, chat_template: str | None = CHATML_WITH_SYSTEM, **config) -> Path:
    """A model directory holding only tokenizer files; `config` entries go into tokenizer_config.json."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.json").write_text(tiny_tokenizer_json(), encoding="utf-8")
    settings = {"bos_token": "<s>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>", **config}
    if chat_template is not None:
        settings["chat_template"] = chat_template
    (path / "tokenizer_config.json").write_text(json.dumps(settings), encoding="utf-8")
    return path


def tiny_tokenizer(path: Path, **kwargs) -> Tokenizer:
    return Tokenizer.from_dir(tiny_tokenizer_dir(path, **kwargs))


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def chat(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def data_config(tmp_path: Path, *sources: dict, **settings) -> DataConfig:
    """A DataConfig over `sources`, caching under tmp_path (never the user's $LMFORGE_HOME)."""
    return DataConfig(train=list(sources), cache_dir=str(tmp_path / "cache"), **settings)


def trained_text(tokenizer: Tokenizer, tokens, trained) -> list[str]:
    """The decoded runs of trained tokens, in order."""
    runs, current = [], []
    for token, flag in zip(tokens, trained, strict=True):
        if flag:
            current.append(int(token))
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(r, skip_special_tokens=False) for r in runs]
