"""Streaming text for generated tokens: each token's new text, so that the pieces join to exactly the full decode.

A token's text can depend on its neighbours: byte-level BPE splits a character's UTF-8 bytes across tokens,
byte-fallback tokenizers (<0xNN> tokens) turn a whole run of byte tokens into U+FFFDs when any of it is invalid, and
SentencePiece decoders strip the space in front of the sequence's first word. So, as vLLM does, we decode a small
window of tokens twice (with and without the newest ones) and emit the difference once it is final.
"""

from collections.abc import Sequence

from lmforge.tokenizer.tokenizer import Tokenizer

# Prompt tokens decoded in front of the generated ones, so that the generated text reads as a continuation (a
# SentencePiece tokenizer keeps the space of the first generated word).
PROMPT_CONTEXT = 6
REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns generated token ids into text pieces as they arrive.

    Without prompt_ids, the pieces (then finish()) join to tokenizer.decode(generated). With prompt_ids they join to
    decode(prompt + generated)[len(decode(prompt)):], which differs only where a tokenizer treats the start of a
    sequence specially (Llama-2 style decoders drop the space before the first word).
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] | None = None, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        # The window: already-emitted tokens kept as context ([:_read]), then tokens whose text is still held back.
        self._ids: list[int] = [int(i) for i in prompt_ids[-PROMPT_CONTEXT:]] if prompt_ids else []
        self._read = len(self._ids)
        self._prefix_text = self._decode(self._ids)
        self._in_byte_run = False
        self.text = ""  # everything emitted so far

    def add(self, token_id: int) -> str:
        """The text that `token_id` completes; "" while it may still change (an unfinished character)."""
        token_id = int(token_id)
        self._ids.append(token_id)
        skipped = self._skip_special_tokens and token_id in self._tokenizer.all_special_ids
        if not skipped:  # a skipped special token does not end a byte run: decode drops it before joining bytes
            self._in_byte_run = token_id in self._tokenizer.byte_fallback_ids
        if self._in_byte_run:
            # A byte run decodes all at once, valid or as one U+FFFD per byte, so nothing of it is final before it ends.
            return ""
        return self._emit(final=False)

    def finish(self) -> str:
        """The text still held back when generation ends (an unfinished character decodes as U+FFFD, as decode does)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        text = self._decode(self._ids)
        if not final and (len(text) <= len(self._prefix_text) or text.endswith(REPLACEMENT)):
            return ""
        piece = text[len(self._prefix_text) :]
        # Slide the window: the tokens just emitted become the context for the next ones. Starting it at the previous
        # emission point keeps its start on a character boundary, so its decode is a true suffix of the full decode.
        self._ids = self._ids[self._read :]
        self._read = len(self._ids)
        self._prefix_text = self._decode(self._ids)
        self.text += piece
        return piece

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens) if ids else ""
