"""tokenizer.json + tokenizer_config.json from a GGUF's tokenizer.ggml.* metadata, built with `tokenizers`.

tokenizer.ggml.model "gpt2" is byte-level BPE (vocab and merges stored as HF spells them); "llama" is
SentencePiece-style BPE with byte fallback, whose merges are rebuilt from the piece scores.
"""

from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from lmforge.errors import LmforgeError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # llama.cpp token types

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
# tokenizer.ggml.pre -> the regexes that split text before byte-level BPE, applied one after another as
# llama.cpp does. "default" (also old files without the key) is GPT-2's split.
SPLITS: dict[str, list[str]] = {
    **dict.fromkeys(("default", "gpt2", "mpt", "olmo"), [_GPT2]),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell"), [r"\p{N}", _GPT2]),
    **dict.fromkeys(("llama-bpe", "llama3", "llama-v3", "dbrx", "smaug-bpe", "falcon3"), [_LLAMA3]),
    **dict.fromkeys(("qwen2", "stablelm2", "deepseek-r1-qwen"), [_QWEN2]),
}
# Llama 3's tokenizer.json sets ignore_merges: a word that is itself a token is never split.
IGNORE_MERGES = {"llama-bpe", "llama3", "llama-v3", "falcon3"}


def build_tokenizer(meta: dict[str, Any], where: str, max_length: int) -> tuple[Tokenizer, dict[str, Any]]:
    """The tokenizer (saved as tokenizer.json) and the tokenizer_config.json contents."""
    kind, tokens = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.tokens")
    if kind is None or not tokens:
        raise LmforgeError(f"{where} carries no tokenizer (tokenizer.ggml.model/tokens); "
                           "use a GGUF exported with its vocabulary")
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    scores = meta.get("tokenizer.ggml.scores")
    if len(types) != len(tokens) or (scores is not None and len(scores) != len(tokens)):
        raise LmforgeError(f"{where}: tokenizer.ggml.token_type/scores and tokenizer.ggml.tokens differ in length; "
                           "the file is corrupt")
    if kind == "gpt2":
        tok = _byte_level(meta, tokens, where)
    elif kind == "llama":
        tok = _sentencepiece(meta, tokens, types, where)
    else:
        raise LmforgeError(f"{where}: tokenizer model {kind!r} is not supported; supported: gpt2 (byte-level BPE), "
                           "llama (SentencePiece BPE)")
    # Control and user-defined tokens match whole before BPE, as llama.cpp matches them.
    added = {i: t for i, (t, ty) in enumerate(zip(tokens, types, strict=True))
             if ty in (UNKNOWN, CONTROL, USER_DEFINED)}
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for i, t in added.items()
                            if types[i] != USER_DEFINED])
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for i, t in added.items()
                    if types[i] == USER_DEFINED])

    def token_id(key: str) -> int | None:
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return int(i) if i is not None and 0 <= i < len(tokens) else None

    def token(key: str) -> str | None:
        i = token_id(key)
        return None if i is None else tokens[i]

    # llama.cpp adds BOS for SentencePiece vocabularies unless the file says otherwise.
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama"))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    bos, eos = token("bos"), token("eos")
    if (add_bos and bos is None) or (add_eos and eos is None):
        raise LmforgeError(f"{where} asks to add a bos/eos token but names no tokenizer.ggml.bos/eos_token_id")
    if add_bos or add_eos:  # tokenizer.json itself adds them, so plain `tokenizers` users get them too
        single = " ".join([f"{bos}:0"] * add_bos + ["$A:0"] + [f"{eos}:0"] * add_eos)
        pair = single + " " + " ".join([f"{bos}:1"] * add_bos + ["$B:1"] + [f"{eos}:1"] * add_eos)
        ids = [(tokens[i], i) for i in {token_id("bos"), token_id("eos")} if i is not None]
        tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=ids)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": token("unknown"),
        "pad_token": token("padding"),
        "model_max_length": max_length,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {
            str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                     "special": types[i] != USER_DEFINED}
            for i, t in added.items()
        },
        "chat_template": _chat_template(meta),
    }
    return tok, {k: v for k, v in config.items() if v is not None}


def _chat_template(meta: dict[str, Any]) -> str | list[dict[str, str]] | None:
    """The template, or HF's list of named templates where the file also has tokenizer.chat_template.<name>."""
    default = meta.get("tokenizer.chat_template")
    named = [{"name": "default", "template": default}] if default else []
    named += [{"name": n, "template": meta[f"tokenizer.chat_template.{n}"]}
              for n in meta.get("tokenizer.chat_templates") or [] if f"tokenizer.chat_template.{n}" in meta]
    return named if len(named) > 1 else default


def _byte_level(meta: dict[str, Any], tokens: list[str], where: str) -> Tokenizer:
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in SPLITS:
        raise LmforgeError(f"{where}: pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported; "
                           f"supported: {', '.join(SPLITS)}")
    merges = meta.get("tokenizer.ggml.merges")
    if not merges:
        raise LmforgeError(f"{where}: a byte-level BPE tokenizer needs tokenizer.ggml.merges, which the file lacks")
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab, [tuple(m.split(" ", 1)) for m in merges], ignore_merges=pre in IGNORE_MERGES))
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in SPLITS[pre]]
    tok.pre_tokenizer = pre_tokenizers.Sequence([*splits, pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                     use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece(meta: dict[str, Any], tokens: list[str], types: list[int], where: str) -> Tokenizer:
    scores = meta.get("tokenizer.ggml.scores")
    if scores is None and not meta.get("tokenizer.ggml.merges"):
        raise LmforgeError(f"{where}: a SentencePiece tokenizer needs tokenizer.ggml.scores, which the file lacks")
    vocab = {t: i for i, t in enumerate(tokens)}
    if meta.get("tokenizer.ggml.merges"):
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    else:
        merges = _merges_from_scores(tokens, scores, types)
    unk_id = meta.get("tokenizer.ggml.unknown_token_id", 0)
    tok = Tokenizer(models.BPE(vocab, merges, unk_token=tokens[unk_id], fuse_unk=True, byte_fallback=True))
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first" if prefix else "never",
                                                 split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + [decoders.Strip(" ", 1, 0)] * prefix)
    return tok


def _merges_from_scores(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """SentencePiece BPE joins the adjacent pair whose joined piece scores highest; BPE in `tokenizers` takes
    the best-ranked merge, so every way to split a normal piece into two known pieces is ranked by its score."""
    ids = {t: i for i, t in enumerate(tokens)}
    ranked = []
    for piece, score, kind in zip(tokens, scores, types, strict=True):
        if kind != NORMAL:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                ranked.append((-score, ids[left], ids[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]
