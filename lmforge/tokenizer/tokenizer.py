"""The model's tokenizer: tokenizer.json run by the `tokenizers` library, configured by the HF side files beside it.

Encoding, decoding and special tokens match transformers' tokenizer loaded from the same directory (v5 semantics:
tokenizer.json's post-processor decides whether BOS/EOS are added).
"""

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken
from tokenizers import Tokenizer as Backend
from tokenizers.processors import TemplateProcessing

from lmforge.errors import LmforgeError
from lmforge.tokenizer.chat_template import render_chat_template

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class Tokenizer:
    """Text <-> token ids, special tokens and the chat template of one model."""

    def __init__(
        self,
        backend: Backend,
        special_tokens: dict[str, str] | None = None,
        extra_special_tokens: Iterable[str] = (),
        chat_templates: dict[str, str] | None = None,
        extra_eos_token_ids: Iterable[int] = (),
        name: str = "this model",
    ):
        """`special_tokens` maps names ("bos_token", ...) to token strings; `chat_templates` maps template names
        ("default", "tool_use", ...) to Jinja text; `name` is how errors refer to the model (its directory)."""
        self._backend = backend
        self.name = name
        self.special_tokens = dict(special_tokens or {})
        _register_special(backend, [*self.special_tokens.values(), *extra_special_tokens])
        # A tokenizer.json may carry truncation/padding for its training pipeline; encode() must return every token.
        backend.no_truncation()
        backend.no_padding()
        self.chat_templates = dict(chat_templates or {})
        self.bos_token, self.bos_token_id = self._named("bos_token")
        self.eos_token, self.eos_token_id = self._named("eos_token")
        self.unk_token, self.unk_token_id = self._named("unk_token")
        self.pad_token, self.pad_token_id = self._named("pad_token")
        eos = {self.eos_token_id, *extra_eos_token_ids}
        self.eos_token_ids: frozenset[int] = frozenset(i for i in eos if i is not None)
        added = backend.get_added_tokens_decoder()
        self.all_special_ids: frozenset[int] = frozenset(i for i, t in added.items() if t.special)
        # Every id the tokenizer can produce, added tokens included (transformers' len(tokenizer), not .vocab_size).
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.byte_fallback_ids: frozenset[int] = _byte_fallback_ids(backend)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "Tokenizer":
        """Loads tokenizer.json with tokenizer_config.json, chat_template.jinja, generation_config.json, config.json."""
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            hint = " (it has only a SentencePiece tokenizer.model)" if (model_dir / "tokenizer.model").is_file() else ""
            raise LmforgeError(
                f"{model_dir} has no tokenizer.json{hint}; convert it once with transformers: "
                f"AutoTokenizer.from_pretrained(dir).save_pretrained(dir)"
            )
        try:
            backend = Backend.from_file(str(path))
        except Exception as e:  # the Rust loader raises a bare Exception for any malformed file
            raise LmforgeError(f"{path} is not a readable tokenizers file ({e}); re-download it") from None
        config = _read_json(model_dir / "tokenizer_config.json")
        special, extra = _special_tokens(config, model_dir)
        if backend.post_processor is None:
            # transformers 5 ignores add_bos_token/add_eos_token when tokenizer.json exists; honouring them where the
            # file has no post-processor keeps old Llama-style directories adding their BOS as transformers 4 did.
            _add_bos_eos(backend, special, bool(config.get("add_bos_token")), bool(config.get("add_eos_token")))
        # Generation stops at generation_config's eos ids (config.json's when there is none), as HF generate does.
        source = model_dir / "generation_config.json"
        source = source if source.is_file() else model_dir / "config.json"
        return cls(
            backend,
            special_tokens=special,
            extra_special_tokens=extra,
            chat_templates=_chat_templates(config, model_dir),
            extra_eos_token_ids=_eos_ids(_read_json(source).get("eos_token_id"), source),
            name=str(model_dir),
        )

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; add_special_tokens adds BOS/EOS where the tokenizer.json post-processor says so."""
        if not isinstance(text, str):
            raise LmforgeError(f"can only encode a string, got {type(text).__name__}")
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """encode() for many texts at once (the Rust side runs them in parallel)."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise LmforgeError("encode_batch takes a list of strings")
        return [e.ids for e in self._backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int] | int, skip_special_tokens: bool = True) -> str:
        """Text of `ids` (ints, a tensor or an array); bytes that do not form UTF-8 characters decode as U+FFFD."""
        ids = ids.tolist() if hasattr(ids, "tolist") else ids  # the Rust side takes only lists of Python ints
        ids = [ids] if isinstance(ids, int) else [int(i) for i in ids]
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def fingerprint(self) -> str:
        """A hash of everything encode() and the chat templates depend on (the tokenizer as loaded, special tokens,
        chat templates, eos ids), not of where the files live; caches of tokenised data are keyed on it."""
        state = {"backend": self._backend.to_str(), "special": self.special_tokens, "templates": self.chat_templates,
                 "eos": sorted(self.eos_token_ids)}
        return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()

    def longest_token_chars(self) -> int:
        """The most characters of text one token can stand for: the longest vocabulary entry as the tokenizer spells
        it (byte-level and byte-fallback spellings are at least as long as their text). A text of more than n times
        this has more than n tokens (for normalisers that do not merge characters, as LLM tokenizers' do not)."""
        return max(map(len, self._backend.get_vocab(with_added_tokens=True)), default=1)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    @property
    def backend(self) -> Backend:
        """The `tokenizers` object itself, for libraries that read a vocabulary from it (the grammar engine)."""
        return self._backend

    @property
    def add_bos_token(self) -> bool:
        """Whether encode(..., add_special_tokens=True) starts with BOS (templates then must not write it twice)."""
        return self.bos_token_id is not None and self.encode("")[:1] == [self.bos_token_id]

    @property
    def chat_template(self) -> str | None:
        """The model's default chat template (chat_template.jinja, or the one named "default")."""
        return self.chat_templates.get("default")

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = False,
        tools: list[dict] | None = None,
        tokenize: bool = False,
        documents: list[dict] | None = None,
        chat_template: str | None = None,
        **template_kwargs: Any,
    ) -> str | list[int]:
        """The prompt for `messages` as the model's chat template writes it (token ids with tokenize=True).

        `chat_template` picks a named template of the model or is Jinja text itself; `template_kwargs` become template
        variables (e.g. enable_thinking=False), overriding the special token strings.
        """
        template = self._pick_template(chat_template, tools)
        variables = {**self.special_tokens, **template_kwargs}
        text = render_chat_template(template, messages, add_generation_prompt, tools, documents, **variables)
        # The template writes every special token itself, so the post-processor must not add another BOS.
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def _pick_template(self, chat_template: str | None, tools: list | None) -> str:
        if chat_template is not None:
            return self.chat_templates.get(chat_template, chat_template)
        if tools is not None and "tool_use" in self.chat_templates:
            return self.chat_templates["tool_use"]
        if self.chat_template is not None:
            return self.chat_template
        if self.chat_templates:
            raise LmforgeError(
                f"{self.name} has several chat templates {sorted(self.chat_templates)} and none named 'default'; "
                "pass chat_template=<name>"
            )
        raise LmforgeError(
            f"{self.name} has no chat template (no 'chat_template' in tokenizer_config.json, no chat_template.jinja); "
            "add a chat_template.jinja to the model directory (e.g. the ChatML template) or send a plain prompt"
        )

    def _named(self, key: str) -> tuple[str | None, int | None]:
        token = self.special_tokens.get(key)
        return token, None if token is None else self._backend.token_to_id(token)


def _read_json(path: Path) -> dict:
    """The JSON object in `path`, or {} when the optional file is absent."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LmforgeError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise LmforgeError(f"{path} must hold a JSON object")
    return data


def _token_text(value: Any) -> str | None:
    """A special token as configs write it: a string or a serialized AddedToken {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _special_tokens(config: dict, model_dir: Path) -> tuple[dict[str, str], list[str]]:
    """Named special tokens (bos_token, eos_token, ..., and model-specific "*_token" strings, as transformers reads
    them) and the list of extra special tokens."""
    sources = [config]
    # Like transformers, the legacy special_tokens_map.json still applies to configs that predate added_tokens_decoder.
    if "added_tokens_decoder" not in config:
        sources.append(_read_json(model_dir / "special_tokens_map.json"))
    named: dict[str, str] = {}
    extra: list[str] = []
    for source in sources:
        for key, value in source.items():
            text = _token_text(value)
            if key.endswith("_token") and text is not None:
                named[key] = text
            elif key in ("additional_special_tokens", "extra_special_tokens"):
                if isinstance(value, dict):  # transformers 5 writes model-specific tokens here as a name -> token map
                    named.update({k: t for k, v in value.items() if (t := _token_text(v)) is not None})
                elif isinstance(value, list):
                    extra += [t for v in value if (t := _token_text(v)) is not None]
    return named, extra


def _register_special(backend: Backend, tokens: Iterable[str]) -> None:
    """Makes every configured special token a special added token, as transformers does on load.

    Special added tokens are matched whole in text and dropped by decode(skip_special_tokens=True).
    """
    special = {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
    missing = list(dict.fromkeys(t for t in tokens if t and t not in special))
    if missing:
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])


def _add_bos_eos(backend: Backend, special: dict[str, str], add_bos: bool, add_eos: bool) -> None:
    bos = [t for t in [special.get("bos_token")] if add_bos and t and backend.token_to_id(t) is not None]
    eos = [t for t in [special.get("eos_token")] if add_eos and t and backend.token_to_id(t) is not None]
    if not bos and not eos:
        return
    single = " ".join([*(f"{t}:0" for t in bos), "$A:0", *(f"{t}:0" for t in eos)])
    pair = " ".join([single, *(f"{t}:1" for t in bos), "$B:1", *(f"{t}:1" for t in eos)])
    ends = [(t, backend.token_to_id(t)) for t in dict.fromkeys(bos + eos)]
    backend.post_processor = TemplateProcessing(single=single, pair=pair, special_tokens=ends)


def _chat_templates(config: dict, model_dir: Path) -> dict[str, str]:
    """Named chat templates; chat_template.jinja and additional_chat_templates/ take priority over the config."""
    files: dict[str, str] = {}
    if (model_dir / "chat_template.jinja").is_file():
        files["default"] = (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    extra_dir = model_dir / "additional_chat_templates"
    if extra_dir.is_dir():
        files.update({p.stem: p.read_text(encoding="utf-8") for p in sorted(extra_dir.glob("*.jinja"))})
    if files:
        return files
    value = config.get("chat_template")
    if value is None:
        return {}
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list) and all(isinstance(t, dict) and {"name", "template"} <= t.keys() for t in value):
        return {t["name"]: t["template"] for t in value}
    raise LmforgeError(
        f"{model_dir / 'tokenizer_config.json'}: chat_template must be a string or a list of "
        "{'name': ..., 'template': ...} objects"
    )


def _eos_ids(value: Any, source: Path) -> list[int]:
    """eos_token_id as generation configs write it: an int, a list of ints, or absent."""
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise LmforgeError(f"{source}: eos_token_id must be an int or a list of ints, got {value!r}")
    return values


def _byte_fallback_ids(backend: Backend) -> frozenset[int]:
    """Ids of the <0xNN> byte tokens, when the decoder joins them (ByteFallback) into characters."""
    # The decoder's state is its JSON; ByteFallback may sit anywhere inside a Sequence.
    if backend.decoder is None or b'"ByteFallback"' not in backend.decoder.__getstate__():
        return frozenset()
    vocab = backend.get_vocab(with_added_tokens=False)
    return frozenset(i for token, i in vocab.items() if _BYTE_TOKEN.fullmatch(token))
