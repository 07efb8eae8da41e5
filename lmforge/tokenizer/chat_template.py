"""Chat templates with Hugging Face semantics: the model's Jinja template turns messages into one prompt string.

Templates come from model repos, so they are untrusted code: they run in jinja2's immutable sandbox and see only
plain JSON data (dicts, lists, strings, numbers), never the caller's objects.
"""

import json
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lmforge.errors import LmforgeError

# Older names under which clients send a message's reasoning; templates read `reasoning_content` or `thinking`.
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def render_chat_template(
    template: str,
    messages: list[dict],
    add_generation_prompt: bool = False,
    tools: list[dict] | None = None,
    documents: list[dict] | None = None,
    **variables: Any,
) -> str:
    """Renders `template` as transformers' `apply_chat_template(..., tokenize=False)` does.

    `variables` reach the template as globals (special token strings like `bos_token`, plus caller extras).
    """
    chat = _check_messages(messages)
    if tools is not None and (not isinstance(tools, (list, tuple)) or not all(isinstance(t, dict) for t in tools)):
        raise LmforgeError("tools must be a list of JSON-schema objects (dicts), e.g. {'type': 'function', ...}")
    compiled = _compile(template)
    try:
        return compiled.render(
            messages=chat,
            tools=_plain(tools),
            documents=_plain(documents),
            add_generation_prompt=add_generation_prompt,
            **_plain(variables),
        )
    except LmforgeError:
        raise
    except jinja2.TemplateError as e:
        raise LmforgeError(f"the chat template failed to render: {e}") from None
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, ZeroDivisionError) as e:
        raise LmforgeError(f"the chat template failed to render ({type(e).__name__}: {e})") from None


def _check_messages(messages: Any) -> list[dict]:
    """Validates the conversation and returns the copy the template sees (None-valued keys dropped, as HF does)."""
    if not isinstance(messages, (list, tuple)):
        kind = type(messages).__name__
        raise LmforgeError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got {kind}")
    if not messages:
        raise LmforgeError("messages is empty; a chat needs at least one {'role': ..., 'content': ...} message")
    chat = []
    for i, (original, message) in enumerate(zip(messages, _plain(list(messages)), strict=True)):
        if not isinstance(message, dict):
            kind = type(original).__name__
            raise LmforgeError(f"messages[{i}] must be a dict with 'role' and 'content', got {kind}")
        # APIs such as OpenAI send content=None next to tool_calls; templates handle a missing key, not a None.
        message = {key: value for key, value in message.items() if value is not None}
        if not isinstance(message.get("role"), str):
            raise LmforgeError(f"messages[{i}] has no 'role' string (e.g. 'system', 'user', 'assistant', 'tool')")
        if "content" not in message and "tool_calls" not in message:
            raise LmforgeError(f"messages[{i}] (role {message['role']!r}) has no 'content'")
        reasoning = next((message[k] for k in REASONING_FIELDS if k in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        chat.append(message)
    return chat


def _plain(value: Any) -> Any:
    """Rebuilds `value` from plain JSON types, so the sandboxed template never touches a caller's object."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):  # str/int/float subclasses (enums, numpy scalars) carry methods of their own
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if callable(getattr(value, "model_dump", None)):  # pydantic models, e.g. parsed OpenAI requests
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


@lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    try:
        return _ENV.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise LmforgeError(f"the chat template is not valid Jinja (line {e.lineno}: {e.message})") from None


def _raise_exception(message: str):
    # Templates call this to reject conversations they cannot format (e.g. roles that do not alternate).
    raise LmforgeError(f"the chat template rejected the conversation: {message}")


def _tojson(value: Any, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML; prompts need the JSON text exactly as json.dumps writes it.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _dict(*args, **kwargs) -> dict:
    # A plain function, not the `dict` type: templates may build dicts but not reach the type's attributes.
    return dict(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """jinja's namespace() without underscore attributes, which could otherwise reach CPython internals."""

    def __init__(*args, **kwargs):  # same signature trick as jinja's Namespace, so namespace(self=1) still works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attribute {name!r}")


class _GenerationTag(jinja2.ext.Extension):
    """Accepts `{% generation %}...{% endgeneration %}` (HF's assistant-mask marker) and renders the body as is."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller) -> str:
        return caller()


# trim_blocks/lstrip_blocks and loopcontrols are what Hub templates are written against.
_ENV = ImmutableSandboxedEnvironment(
    trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
)
_ENV.filters["tojson"] = _tojson
_ENV.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_dict, namespace=_Namespace)
