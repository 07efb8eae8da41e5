"""Prompt rows for online RL (`format: prompt`, recipe grpo): {"prompt": messages or a string, ...other columns}.

A messages prompt (ending in a user turn) is rendered with the chat template and its generation prompt, as
`LLM.chat` renders it; a string prompt is tokenised as it is, as `LLM.generate` does (TRL's conversational and
standard formats). The other columns (an answer to check, say) travel with the row to the reward functions. Bad rows
are skipped and counted as the SFT pipeline does, or stop the run under data.strict with file:row.
"""

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

from lmforge.config.schema import DataConfig, DataSource
from lmforge.data.formats import Message, RowFormat
from lmforge.data.sources import MalformedRow, Origin, open_source
from lmforge.data.templates import ChatRenderer
from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer

log = logging.getLogger("lmforge")


@dataclass(frozen=True, slots=True)
class PromptRow:
    origin: Origin
    prompt: str | list[Message]  # as the reward functions receive it (TRL: conversational or standard)
    token_ids: list[int]
    columns: dict[str, Any]  # the row's other fields


def load_prompts(sources: list[DataSource], where: str, cfg: DataConfig, tokenizer: Tokenizer,
                 max_prompt_tokens: int, limit: int | None = None) -> list[PromptRow]:
    """Every usable prompt row of the sources, in file order; a prompt longer than max_prompt_tokens is skipped
    (counted as "prompt too long")."""
    renderer = None
    rows: list[PromptRow] = []
    skipped: Counter = Counter()
    first: dict[str, str] = {}
    for index, source in enumerate(sources):
        fmt = RowFormat(source, f"{where}.{index}")
        opened = open_source(source)
        for number, record in opened.rows():
            if limit is not None and len(rows) >= limit:
                break
            origin = Origin(opened.name, number)
            try:
                prompt = _prompt(fmt, record)
                if isinstance(prompt, str):
                    ids = tokenizer.encode(prompt)
                else:
                    renderer = renderer or ChatRenderer(tokenizer, cfg.template)
                    ids = tokenizer.encode(renderer.render(prompt, add_generation_prompt=True),
                                           add_special_tokens=False)
                if len(ids) > max_prompt_tokens:
                    raise MalformedRow("prompt too long", f"{len(ids)} tokens, more than the {max_prompt_tokens} "
                                                          "data.max_seq_len leaves beside grpo.max_completion_length")
            except MalformedRow as bad:
                if cfg.strict:
                    raise LmforgeError(f"{origin}: {bad.detail} (data.strict is set)") from None
                skipped[bad.reason] += 1
                first.setdefault(bad.reason, f"{origin}: {bad.detail}")
                continue
            columns = {k: v for k, v in record.items() if k != "prompt"}
            rows.append(PromptRow(origin, prompt, ids, columns))
    for reason, count in skipped.items():
        log.warning("%s: skipped %d prompt row%s (%s), the first at %s", where, count, "s" * (count > 1), reason,
                    first[reason])
    if not rows:
        raise LmforgeError(f"{where} has no usable prompt rows" + (f" ({dict(skipped)} skipped)" if skipped else ""))
    log.info("%s: %d prompt rows", where, len(rows))
    return rows


def _prompt(fmt: RowFormat, record: Any) -> str | list[Message]:
    if isinstance(record, MalformedRow):
        raise record
    if not isinstance(record, dict):
        raise MalformedRow("not an object", f"the row is a {type(record).__name__}, not an object of columns")
    if isinstance(record.get("prompt"), str):
        if not record["prompt"]:
            raise MalformedRow("empty field", "'prompt' is an empty string")
        return record["prompt"]
    return fmt.prompt_messages(record)
