"""IncrementalDetokenizer: streamed pieces join to exactly Tokenizer.decode of the same ids."""

import random

import pytest

from lmforge.tokenizer import IncrementalDetokenizer, Tokenizer
from tests.tokenizer_refs import TEXTS, llama_style_dir


@pytest.fixture(scope="module", params=["smollm2", "llama_style"])
def tok(request, tmp_path_factory) -> Tokenizer:
    if request.param == "smollm2":
        return Tokenizer.from_dir(request.getfixturevalue("smollm2_tokenizer_dir"))
    return Tokenizer.from_dir(llama_style_dir(tmp_path_factory.mktemp("llama_style")))


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Tokenizer:
    return Tokenizer.from_dir(llama_style_dir(tmp_path_factory.mktemp("llama_style")))


def stream(tok: Tokenizer, ids: list[int], prompt_ids=None, skip_special_tokens: bool = True) -> list[str]:
    detok = IncrementalDetokenizer(tok, prompt_ids, skip_special_tokens)
    pieces = [detok.add(i) for i in ids] + [detok.finish()]
    assert detok.text == "".join(pieces)
    return pieces


def partial_tokens(tok: Tokenizer) -> list[int]:
    """Tokens that carry a single byte (byte-level BPE) or are <0xNN> byte tokens: they split characters."""
    if tok.byte_fallback_ids:
        return sorted(tok.byte_fallback_ids)
    return [i for i in range(tok.vocab_size) if len(tok.id_to_token(i) or "") == 1]


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_random_sequences_join_to_decode(tok, skip_special_tokens):
    rng = random.Random(1)
    partial, special = partial_tokens(tok), sorted(tok.all_special_ids)
    for _ in range(400):
        ids = []
        for _ in range(rng.randint(1, 24)):
            r = rng.random()
            ids.append(
                rng.choice(partial) if r < 0.5 else rng.choice(special) if r < 0.6 else rng.randrange(tok.vocab_size)
            )
        pieces = stream(tok, ids, skip_special_tokens=skip_special_tokens)
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens), ids


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_text_token_by_token(tok, skip_special_tokens):
    for text in TEXTS:
        ids = tok.encode(text)
        pieces = stream(tok, ids, skip_special_tokens=skip_special_tokens)
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens), text
        assert not any("\ufffd" in p for p in pieces), "a piece showed half a character"
    # It streams: text arrives before the end, not all in finish().
    ids = tok.encode("Emoji 😀 and 中文 then plain words, one by one.", add_special_tokens=False)
    pieces = stream(tok, ids)
    assert sum(1 for p in pieces[:-1] if p) >= 8 and pieces[-1] == ""


def test_multibyte_character_waits_for_its_last_token(smollm2_tokenizer_dir):
    tok = Tokenizer.from_dir(smollm2_tokenizer_dir)
    ids = tok.encode("👨\u200d👩", add_special_tokens=False)
    pieces = stream(tok, ids)
    assert len(ids) > 3 and pieces[0] == "" and "".join(pieces) == "👨\u200d👩"
    assert all(p == "" or "\ufffd" not in p for p in pieces)


def test_byte_run_is_held_until_it_ends(llama):
    b = {x: llama.token_to_id(f"<0x{x:02X}>") for x in (0xE4, 0xB8, 0xAD)}
    word = llama.token_to_id("▁the")
    zhong = [b[0xE4], b[0xB8], b[0xAD]]
    # A complete character in a run can still turn into U+FFFDs if a stray byte joins the run, so nothing is emitted
    # until a non-byte token ends it.
    assert stream(llama, zhong + [word])[:4] == ["", "", "", "中 the"]
    bad = zhong + [b[0xE4], word]
    assert "".join(stream(llama, bad)) == llama.decode(bad) == "\ufffd" * 4 + " the"
    # A skipped special token inside a run does not end it; a kept one does.
    eos = llama.eos_token_id
    split = [b[0xE4], eos, b[0xB8], b[0xAD]]
    assert "".join(stream(llama, split)) == llama.decode(split) == "中"
    assert "".join(stream(llama, split, skip_special_tokens=False)) == "\ufffd</s>\ufffd\ufffd"
    # Generation may stop inside a run: finish() returns it, decoded as decode() does.
    assert stream(llama, zhong) == ["", "", "", "中"]


def test_prompt_makes_generated_text_a_continuation(tok):
    prompt = tok.encode("User: say hi in two languages\nAssistant:")
    generated = tok.encode(" Hello 世界 😀! Done.", add_special_tokens=False)
    text = "".join(stream(tok, generated, prompt_ids=prompt))
    full, prompt_text = tok.decode(prompt + generated), tok.decode(prompt)
    assert text == full[len(prompt_text) :]
    # A SentencePiece decoder drops the first word's space only at the start of a sequence: with a prompt it stays.
    assert text.startswith(" Hello")
    assert tok.decode(generated) == (text if not tok.byte_fallback_ids else text[1:])
    # Random continuations of a real prompt too.
    rng = random.Random(2)
    for _ in range(100):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 10))]
        text = "".join(stream(tok, ids, prompt_ids=prompt))
        assert text == tok.decode(prompt + ids)[len(prompt_text) :], ids
