"""--reasoning-parser: the model's thinking (`<think>...</think>`) goes to `reasoning_content`, the rest to
`content`, whole or as streamed deltas of each. Structured output applies after the end tag (the engine starts the
grammar at its token: lmforge/engine/structured.py)."""

from dataclasses import dataclass

from lmforge.errors import LmforgeError


@dataclass(frozen=True)
class ReasoningParser:
    name: str
    implicit_start: bool  # the chat template opens the thinking: output before the end tag is reasoning anyway
    start: str = "<think>"
    end: str = "</think>"

    def token_ids(self, tokenizer) -> tuple[int, int]:
        """The ids of the start and end tags, each a single token in the models these parsers are for."""
        ids = [tokenizer.token_to_id(tag) for tag in (self.start, self.end)]
        if None in ids:
            raise LmforgeError(f"--reasoning-parser {self.name}: this model's tokenizer has no {self.start} / "
                               f"{self.end} tokens; it is not a model this parser is for")
        return ids[0], ids[1]

    def split(self, text: str) -> tuple[str | None, str | None]:
        """(reasoning_content, content) of a whole output; None where there is none."""
        at = text.find(self.end)
        if at >= 0:
            reasoning, content = text[:at], text[at + len(self.end):]
        elif self.implicit_start or text.lstrip().startswith(self.start):
            reasoning, content = text, ""
        else:
            reasoning, content = "", text
        reasoning = reasoning.lstrip().removeprefix(self.start) if reasoning else reasoning
        return reasoning or None, content.lstrip("\n") or None

    def stream(self) -> "ReasoningStream":
        return ReasoningStream(self)


class ReasoningStream:
    """Turns one choice's text deltas into (reasoning delta, content delta) pairs."""

    def __init__(self, parser: ReasoningParser):
        self.parser = parser
        self.text = ""
        self.sent = [0, 0]  # characters of reasoning / content already sent

    def feed(self, delta: str, finished: bool = False) -> tuple[str, str]:
        self.text += delta
        p = self.parser
        if not finished and p.end not in self.text and (p.start.startswith(self.text.lstrip()) or
                                                        _ends_with_prefix(self.text, p.end)):
            return "", ""  # a tag may be arriving: wait for the next delta
        reasoning, content = (x or "" for x in p.split(self.text))
        out = reasoning[self.sent[0]:], content[self.sent[1]:]
        self.sent = [len(reasoning), len(content)]
        return out


def _ends_with_prefix(text: str, tag: str) -> bool:
    return any(text.endswith(tag[:k]) for k in range(1, len(tag)))


PARSERS = {
    "deepseek_r1": ReasoningParser("deepseek_r1", implicit_start=True),
    "qwen3": ReasoningParser("qwen3", implicit_start=False),
}


def get_reasoning_parser(name: str) -> ReasoningParser:
    if name not in PARSERS:
        raise LmforgeError(f"--reasoning-parser {name!r} is not known; choose one of {', '.join(sorted(PARSERS))}")
    return PARSERS[name]
