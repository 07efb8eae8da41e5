"""Parsed rows -> token ids with a per-token `trained` flag (the token is a prediction target of the loss).

Chats: the rendered conversation is cut at its assistant spans (templates.py) and each piece is tokenised on its
own, then laid end to end. That is also how generation sees it: the prompt is tokenised up to the generation prompt
and the model produces the reply's tokens after it, so no token ever straddles a prompt/reply boundary. Within an
assistant turn everything up to and including its end-of-turn token (<|im_end|>, <|eot_id|>, EOS) is trained; what a
template writes after it (a newline) is not, and a template that leaves the end-of-turn token out gets a warning.
train_on_inputs trains every token. Text rows are trained throughout and end in EOS. The first token of a sample is
never trained (no position predicts it); samples longer than max_seq_len keep their first max_seq_len tokens.
"""

import logging
from dataclasses import dataclass

from lmforge.config.schema import DataConfig
from lmforge.data.formats import Chat, Preference, Text, Unpaired
from lmforge.data.sources import MalformedRow
from lmforge.data.templates import ChatRenderer, TemplateNotIncremental
from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer

log = logging.getLogger("lmforge")

# Skip reasons that say nothing is wrong with the row itself: strict mode skips (and counts) these too.
NOT_MALFORMED = frozenset({"nothing trained after truncation", "prompt fills max_seq_len"})


@dataclass(frozen=True, slots=True)
class Encoded:
    tokens: list[int]
    trained: list[bool]
    truncated: bool


@dataclass(frozen=True, slots=True)
class EncodedPair:
    prompt: list[int]
    chosen: list[int]
    chosen_trained: list[bool]
    rejected: list[int]
    rejected_trained: list[bool]
    truncated: bool


@dataclass(frozen=True, slots=True)
class EncodedUnpaired:
    prompt: list[int]
    completion: list[int]
    completion_trained: list[bool]
    desirable: bool
    truncated: bool


class SampleEncoder:
    """Tokenises rows of every format for one tokenizer and data config."""

    def __init__(self, tokenizer: Tokenizer, cfg: DataConfig):
        self.tokenizer = tokenizer
        self.template = cfg.template
        self.train_on_inputs = cfg.train_on_inputs
        self.max_seq_len = cfg.max_seq_len
        self._renderer: ChatRenderer | None = None
        self._warned = False

    @property
    def renderer(self) -> ChatRenderer:
        if self._renderer is None:  # built on the first chat row: text-only data needs no chat template
            self._renderer = ChatRenderer(self.tokenizer, self.template)
        return self._renderer

    def encode(self, rows: list[tuple[str, Chat | Text | Preference | Unpaired]]
               ) -> list[Encoded | EncodedPair | EncodedUnpaired | MalformedRow]:
        """Encodes (origin, row) pairs of one kind; a row that cannot be encoded comes back as MalformedRow."""
        if not rows:
            return []
        kind = type(rows[0][1])
        if kind is Text:
            return [self._text(ids) for ids in self.tokenizer.encode_batch([r.text for _, r in rows])]
        pieces: list[list[tuple[str, bool]] | MalformedRow] = [self._pieces(origin, row) for origin, row in rows]
        texts = [text for p in pieces if not isinstance(p, MalformedRow) for text, _ in p]
        ids = iter(self.tokenizer.encode_batch(texts, add_special_tokens=False))
        out: list[Encoded | EncodedPair | EncodedUnpaired | MalformedRow] = []
        for (_, row), p in zip(rows, pieces, strict=True):
            if isinstance(p, MalformedRow):
                out.append(p)
                continue
            encoded = [(next(ids), assistant) for _, assistant in p]
            if kind is Preference:
                out.append(self._pair(encoded))
            elif kind is Unpaired:
                out.append(self._unpaired(encoded, row.desirable))
            else:
                out.append(self._chat(encoded))
        return out

    def _pieces(self, origin: str, row: Chat | Preference | Unpaired) -> list[tuple[str, bool]] | MalformedRow:
        """The rendered text cut into (piece, is_assistant_turn); a preference row gives prompt, chosen, rejected,
        an unpaired (kto) row prompt and completion."""
        try:
            if isinstance(row, Preference | Unpaired):
                prompt = self.renderer.render(row.prompt, add_generation_prompt=True)
                pieces = [(prompt, False)]
                replies = (row.chosen, row.rejected) if isinstance(row, Preference) else (row.completion,)
                for reply in replies:
                    full, spans = self.renderer.assistant_spans([*row.prompt, reply])
                    start, end = spans[-1]
                    if full[:start] != prompt:
                        raise TemplateNotIncremental(len(row.prompt))
                    pieces.append((full[start:end], True))
                return pieces
            full, spans = self.renderer.assistant_spans(row.messages)
        except TemplateNotIncremental as e:
            raise e.error(self.template, origin) from None
        except LmforgeError as e:  # the template rejected this conversation (e.g. roles that do not alternate)
            return MalformedRow("template rejected", str(e))
        pieces, done = [], 0
        for start, end in spans:
            pieces += [(full[done:start], False), (full[start:end], True)]
            done = end
        pieces.append((full[done:], False))
        return [(text, assistant) for text, assistant in pieces if text]

    def _reply_flags(self, ids: list[int]) -> list[bool]:
        """Trained flags of one assistant turn's tokens: up to and including its last end-of-turn token."""
        ends = self.renderer.end_of_turn_ids
        last = next((i for i in range(len(ids) - 1, -1, -1) if ids[i] in ends), None)
        if last is None:
            if not self._warned:
                self._warned = True
                log.warning("the %r template leaves its end-of-turn token (%s) out of assistant turns, so the model "
                            "will not learn to stop; use a template that closes each turn with it", self.template,
                            self.renderer.end_of_turn_text)
            return [True] * len(ids)
        return [True] * (last + 1) + [False] * (len(ids) - last - 1)

    def _chat(self, pieces: list[tuple[list[int], bool]]) -> Encoded | MalformedRow:
        tokens: list[int] = []
        trained: list[bool] = []
        for ids, assistant in pieces:
            tokens += ids
            trained += self._reply_flags(ids) if assistant and not self.train_on_inputs else [
                assistant or self.train_on_inputs] * len(ids)
        return self._finish(tokens, trained)

    def _text(self, ids: list[int]) -> Encoded | MalformedRow:
        eos = self.tokenizer.eos_token_id
        tokens = ids + [eos] if eos is not None and ids[-1:] != [eos] else ids
        return self._finish(tokens, [True] * len(tokens))

    def _finish(self, tokens: list[int], trained: list[bool]) -> Encoded | MalformedRow:
        truncated = len(tokens) > self.max_seq_len
        tokens, trained = tokens[: self.max_seq_len], trained[: self.max_seq_len]
        trained[:1] = [False] * len(trained[:1])
        if not any(trained):
            return MalformedRow("nothing trained after truncation",
                                f"no trained token is left within max_seq_len {self.max_seq_len}")
        return Encoded(tokens, trained, truncated)

    def _pair(self, pieces: list[tuple[list[int], bool]]) -> EncodedPair | MalformedRow:
        (prompt, _), (chosen, _), (rejected, _) = pieces
        room = self.max_seq_len - len(prompt)
        if room < 1:
            return MalformedRow("prompt fills max_seq_len", f"the prompt alone has {len(prompt)} tokens "
                                                            f"(max_seq_len {self.max_seq_len})")
        truncated = max(len(chosen), len(rejected)) > room
        # Flags before truncation: a reply cut short has lost its end-of-turn token, the template has not.
        chosen_flags, rejected_flags = self._reply_flags(chosen)[:room], self._reply_flags(rejected)[:room]
        return EncodedPair(prompt, chosen[:room], chosen_flags, rejected[:room], rejected_flags, truncated)

    def _unpaired(self, pieces: list[tuple[list[int], bool]], desirable: bool) -> EncodedUnpaired | MalformedRow:
        (prompt, _), (completion, _) = pieces
        room = self.max_seq_len - len(prompt)
        if room < 1:
            return MalformedRow("prompt fills max_seq_len", f"the prompt alone has {len(prompt)} tokens "
                                                            f"(max_seq_len {self.max_seq_len})")
        flags = self._reply_flags(completion)[:room]  # before truncation, as for pairs
        return EncodedUnpaired(prompt, completion[:room], flags, desirable, len(completion) > room)
