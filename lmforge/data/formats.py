"""Row formats (DataSource.format): each turns one record into a conversation, a text, or a preference pair.

    alpaca      {"instruction", "input" (optional), "output"}   -> user: instruction (+ blank line + input),
                                                                   assistant: output
    messages    {"messages": [{"role", "content"}, ...]}        OpenAI style; roles system/user/assistant
    sharegpt    {"conversations": [{"from", "value"}, ...]}     human/gpt/system (and user/assistant)
    text        {"text": "..."}                                 raw text, every token trained
    preference  {"prompt", "chosen", "rejected"}                prompt: a string or messages ending in a user turn;
                                                                   chosen/rejected: a string or one assistant message
    kto         {"prompt", "completion", "label"}               TRL's unpaired preference rows: prompt as above,
                                                                   completion a string or one assistant message,
                                                                   label a JSON bool (true: desirable)

DataSource.field names the column when it is not the format's default; DataSource.roles maps extra role names onto
system/user/assistant. A list column may also hold its JSON text (as CSV cells do). Bad rows raise `MalformedRow`
with a short reason ("missing field", "unknown role", ...) that the report counts.
"""

import json
from dataclasses import dataclass
from typing import Any

from lmforge.config.schema import DataSource
from lmforge.data.sources import MalformedRow
from lmforge.errors import LmforgeError

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
DEFAULT_FIELDS = {"messages": "messages", "sharegpt": "conversations", "text": "text"}

Message = dict[str, str]


@dataclass(frozen=True, slots=True)
class Chat:
    messages: list[Message]


@dataclass(frozen=True, slots=True)
class Text:
    text: str


@dataclass(frozen=True, slots=True)
class Preference:
    prompt: list[Message]  # ends with a user turn
    chosen: Message
    rejected: Message


@dataclass(frozen=True, slots=True)
class Unpaired:
    prompt: list[Message]  # ends with a user turn
    completion: Message
    desirable: bool


class RowFormat:
    """Parses the records of one DataSource."""

    def __init__(self, source: DataSource, where: str):
        if source.field is not None and source.format not in DEFAULT_FIELDS:
            raise LmforgeError(f"{where}.field applies to the {', '.join(DEFAULT_FIELDS)} formats, not "
                               f"{source.format} (whose columns are fixed)")
        bad = {k: v for k, v in source.roles.items() if v not in ROLES}
        if bad:
            raise LmforgeError(f"{where}.roles maps onto {', '.join(ROLES)}; {bad} is not one of them")
        self.format = source.format
        self.field = source.field or DEFAULT_FIELDS.get(source.format)
        base = SHAREGPT_ROLES if source.format == "sharegpt" else {r: r for r in ROLES}
        self.roles = {**base, **source.roles}

    def parse(self, record: Any) -> Chat | Text | Preference | Unpaired:
        if isinstance(record, MalformedRow):
            raise record
        if not isinstance(record, dict):
            raise MalformedRow("not an object", f"the row is a {type(record).__name__}, not an object of columns")
        if self.format == "alpaca":
            return self._alpaca(record)
        if self.format == "text":
            return Text(_string(record, self.field, allow_empty=False))
        if self.format == "preference":
            return self._preference(record)
        if self.format == "kto":
            return self._unpaired(record)
        key_role, key_content = ("from", "value") if self.format == "sharegpt" else ("role", "content")
        turns = _list(record, self.field)
        if not turns:
            raise MalformedRow("empty conversation", f"{self.field!r} is an empty list")
        messages = [self._message(turn, i, key_role, key_content) for i, turn in enumerate(turns)]
        _check_chat(messages, self.field)
        return Chat(messages)

    def _alpaca(self, record: dict) -> Chat:
        instruction = _string(record, "instruction", allow_empty=False)
        extra = record.get("input")
        if extra is not None and not isinstance(extra, str):
            raise MalformedRow("wrong type", f"'input' must be a string, got {type(extra).__name__}")
        output = _string(record, "output", allow_empty=False)
        extra = (extra or "").strip()
        content = f"{instruction}\n\n{extra}" if extra else instruction
        # instruction/input ride along for the alpaca template's classic prompt; other templates read content.
        user = {"role": "user", "content": content, "instruction": instruction, "input": extra}
        return Chat([user, {"role": "assistant", "content": output}])

    def _preference(self, record: dict) -> Preference:
        return Preference(self.prompt_messages(record), self._response(record, "chosen"),
                          self._response(record, "rejected"))

    def _unpaired(self, record: dict) -> Unpaired:
        prompt, completion = self.prompt_messages(record), self._response(record, "completion")
        label = record.get("label")
        if not isinstance(label, bool):
            kind = "missing" if label is None else f"{label!r}, a {type(label).__name__}"
            raise MalformedRow("missing field" if label is None else "wrong type",
                               f"'label' must be true (desirable) or false (undesirable), got {kind}")
        return Unpaired(prompt, completion, label)

    def prompt_messages(self, record: dict) -> list[Message]:
        prompt = record.get("prompt")
        if isinstance(prompt, str):
            messages = [{"role": "user", "content": _string(record, "prompt", allow_empty=False)}]
        else:
            turns = _list(record, "prompt")
            messages = [self._message(turn, i, "role", "content") for i, turn in enumerate(turns)]
            if not messages or messages[-1]["role"] != "user":
                raise MalformedRow("prompt not ending in a user turn", "'prompt' must end with a user message")
        return messages

    def _response(self, record: dict, key: str) -> Message:
        value = record.get(key)
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if isinstance(value, dict):
            message = self._message(value, 0, "role", "content")
            if message["role"] != "assistant":
                raise MalformedRow("wrong type", f"{key!r} must be an assistant message, not {message['role']}")
            if not message["content"].strip():
                raise MalformedRow("empty text", f"{key!r} is an assistant message with no content")
            return message
        return {"role": "assistant", "content": _string(record, key, allow_empty=False)}

    def _message(self, turn: Any, i: int, key_role: str, key_content: str) -> Message:
        where = f"{self.field or 'prompt'}[{i}]"
        if not isinstance(turn, dict):
            raise MalformedRow("wrong type", f"{where} is a {type(turn).__name__}, not a {{{key_role!r}, "
                                             f"{key_content!r}}} object")
        role = turn.get(key_role)
        if not isinstance(role, str):
            raise MalformedRow("missing field", f"{where} has no {key_role!r} string")
        if role not in self.roles:
            raise MalformedRow("unknown role", f"{where} has role {role!r}; known roles are {sorted(self.roles)} "
                                               "(map others with the data source's roles)")
        content = turn.get(key_content)
        if not isinstance(content, str):
            kind = "missing" if content is None else type(content).__name__
            raise MalformedRow("missing field" if content is None else "wrong type",
                               f"{where} {key_content!r} must be a string, got {kind}")
        return {"role": self.roles[role], "content": content}


def _check_chat(messages: list[Message], field: str) -> None:
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        raise MalformedRow("no assistant turn", f"{field!r} has no assistant message to train on")
    first = roles.index("assistant")
    if "user" not in roles[:first] and "system" not in roles[:first]:
        raise MalformedRow("assistant before any prompt", f"{field!r} starts with an assistant message")
    if any(m["role"] == "assistant" and not m["content"].strip() for m in messages):
        raise MalformedRow("empty assistant turn", f"{field!r} has an assistant message with no content")


def _string(record: dict, key: str, allow_empty: bool) -> str:
    value = record.get(key)
    if value is None:
        raise MalformedRow("missing field", f"no {key!r} column (columns: {sorted(record)})")
    if not isinstance(value, str):
        raise MalformedRow("wrong type", f"{key!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise MalformedRow("empty text", f"{key!r} is empty")
    return value


def _list(record: dict, key: str) -> list:
    value = record.get(key)
    if value is None:
        raise MalformedRow("missing field", f"no {key!r} column (columns: {sorted(record)})")
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise MalformedRow("wrong type", f"{key!r} is text that is not a JSON list ({e.msg})") from None
    if not isinstance(value, list):
        raise MalformedRow("wrong type", f"{key!r} must be a list of messages, got {type(value).__name__}")
    return value
