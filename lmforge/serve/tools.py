"""Tool calling as vLLM serves it: `tools`, `tool_choice` (none / auto / required / a named function) and
`parallel_tool_calls` (several calls in one answer unless it is false: then `required` generates exactly one and
`auto` keeps a parser's first, as vLLM). `required` and a named function generate under a JSON schema (structured
output), so the arguments always match the function's parameters; `auto` lets the model write freely and a
--tool-call-parser finds the calls in its text (Hermes/Qwen `<tool_call>` JSON, Llama 3 JSON, Mistral
`[TOOL_CALLS]`). Output a parser cannot read is returned as plain content, never an error."""

import json
import re
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from lmforge.engine.sampling_params import StructuredOutputsParams
from lmforge.serve.errors import bad_request

_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = field(default_factory=lambda: f"chatcmpl-tool-{uuid.uuid4().hex[:24]}")

    def to_dict(self, index: int | None = None) -> dict:
        out = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return out if index is None else {"index": index, **out}


@dataclass(frozen=True)
class ToolPlan:
    """What a chat request asks of tools: the mode, the functions (for the chat template) and, for required /
    named, the constraint its output is generated under."""

    mode: str  # "none", "auto", "required" or "named"
    tools: list[dict]
    name: str | None = None
    constraint: StructuredOutputsParams | None = None
    parallel: bool = True  # parallel_tool_calls: False keeps only the first call a parser finds (as vLLM)

    def calls(self, text: str, parser: "ToolParser | None") -> tuple[str | None, list[ToolCall]]:
        """(content, tool calls) of a finished output."""
        content, calls = self._all_calls(text, parser)
        return content, calls if self.parallel else calls[:1]

    def _all_calls(self, text: str, parser: "ToolParser | None") -> tuple[str | None, list[ToolCall]]:
        if self.mode == "named":
            return None, [ToolCall(self.name, text)]
        if self.mode == "required":
            try:
                items = json.loads(text)
                return None, [ToolCall(i["name"], json.dumps(i["parameters"], ensure_ascii=False)) for i in items]
            except (ValueError, TypeError, KeyError):  # cut short by max_tokens: what there is, as content
                return text, []
        if self.mode == "auto" and parser is not None:
            return parser.parse(text)
        return text, []


def plan_tools(tools, tool_choice, parallel_tool_calls: bool | None, auto_enabled: bool) -> ToolPlan:
    """Validates the request's tool fields (400 naming the field) and says how to generate."""
    if tools is None:
        if tool_choice not in (None, "none"):
            raise bad_request("tool_choice needs tools: the request has none.", "tool_choice")
        return ToolPlan("none", [])
    if not isinstance(tools, list):
        raise bad_request("tools must be a list of {'type': 'function', 'function': {...}} objects.", "tools")
    functions = [_check_tool(t, i) for i, t in enumerate(tools)]
    names = [f["name"] for f in functions]
    choice = "auto" if tool_choice is None else tool_choice
    if choice == "none" or not tools:
        return ToolPlan("none", tools)
    if choice == "auto":
        if not auto_enabled:
            raise bad_request('"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be '
                              "set.", "tool_choice")
        return ToolPlan("auto", tools, parallel=parallel_tool_calls is not False)
    if choice == "required":
        alternatives = [{"type": "object", "properties": {"name": {"type": "string", "enum": [f["name"]]},
                                                          "parameters": f["parameters"]},
                         "required": ["name", "parameters"]} for f in functions]
        schema = {"type": "array", "minItems": 1, "items": {"anyOf": alternatives}}
        if parallel_tool_calls is False:
            schema["maxItems"] = 1
        return ToolPlan("required", tools, constraint=StructuredOutputsParams(json=schema))
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name not in names:
            raise bad_request(f"tool_choice names the function {name!r}, which is not among tools "
                              f"({', '.join(names)}).", "tool_choice")
        return ToolPlan("named", tools, name, StructuredOutputsParams(json=functions[names.index(name)]["parameters"]))
    raise bad_request("tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': "
                      "{'name': ...}}.", "tool_choice")


def _check_tool(tool, i: int) -> dict:
    where = f"tools[{i}]"
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
        raise bad_request(f"{where} must be {{'type': 'function', 'function': {{...}}}}.", where)
    function = dict(tool["function"])
    unknown = sorted(set(function) - {"name", "description", "parameters", "strict"})
    if unknown:
        raise bad_request(f"Unrecognized field {unknown[0]!r} in {where}.function.", f"{where}.function.{unknown[0]}")
    if not isinstance(function.get("name"), str) or not _NAME.match(function["name"]):
        raise bad_request(f"{where}.function.name must be 1-64 letters, digits, '_', '-', '.' or ':'.",
                          f"{where}.function.name")
    parameters = function.setdefault("parameters", {"type": "object", "properties": {}})
    if not isinstance(parameters, dict) or parameters.get("type") != "object":
        raise bad_request(f"{where}.function.parameters must be a JSON schema of type 'object'.",
                          f"{where}.function.parameters")
    return function


def template_messages(messages: list[dict]) -> list[dict]:
    """Assistant tool_calls as chat templates read them: `arguments` as an object rather than JSON text (as vLLM
    renders them; Llama/Hermes/Qwen templates write `arguments | tojson`)."""
    out = []
    for m in messages:
        calls = m.get("tool_calls")
        if calls:
            m = {**m, "tool_calls": [_with_object_arguments(c) for c in calls]}
        out.append(m)
    return out


def _with_object_arguments(call: dict) -> dict:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
        return call
    try:
        arguments = json.loads(function["arguments"])
    except ValueError:
        return call
    return {**call, "function": {**function, "arguments": arguments}}


# ---- parsers: model text -> (content, calls) ---------------------------------------------------------------------
def _json_objects(text: str) -> list:
    """Consecutive JSON values in text, separated by whitespace, ',' or ';'; ValueError if anything else."""
    decoder, out, i = json.JSONDecoder(), [], 0
    while True:
        while i < len(text) and text[i] in " \t\r\n;,":
            i += 1
        if i == len(text):
            return out
        value, i = decoder.raw_decode(text, i)
        out.append(value)


def _call(obj) -> ToolCall:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        raise ValueError("not a tool call")
    arguments = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(arguments, str):  # already JSON text (some models write it so)
        json.loads(arguments)
        return ToolCall(obj["name"], arguments)
    return ToolCall(obj["name"], json.dumps(arguments, ensure_ascii=False))


class ToolParser(ABC):
    """Finds tool calls in a model's free text. `start`: the marker from which text is a call (streaming holds
    text from there until the end)."""

    name = ""
    start = ""

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        at = self.find_start(text)
        if at < 0:
            return text, []
        try:
            calls = self._calls(text[at:])
        except (ValueError, TypeError, KeyError):
            return text, []  # malformed: the model's text as it is
        if not calls:
            return text, []
        return text[:at].strip() or None, calls

    def find_start(self, text: str) -> int:
        return text.find(self.start)

    @abstractmethod
    def _calls(self, text: str) -> list[ToolCall]:
        """The calls in `text` (which starts at the format's start tag); raises ValueError / KeyError / TypeError on
        malformed output."""


class HermesParser(ToolParser):
    """Hermes / Qwen 2.5+ / Qwen3: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, repeated."""

    name, start = "hermes", "<tool_call>"

    def _calls(self, text: str) -> list[ToolCall]:
        bodies = re.findall(r"<tool_call>(.*?)(?:</tool_call>|$)", text, re.S)
        return [_call(json.loads(b)) for b in bodies]


class Llama3JsonParser(ToolParser):
    """Llama 3.1+ JSON tool calls: `{"name": ..., "parameters": {...}}` (optionally after <|python_tag|>),
    several separated by ';'. Only output that starts with the call is a call, as vLLM's parser reads it."""

    name, start = "llama3_json", "<|python_tag|>"

    def find_start(self, text: str) -> int:
        stripped = text.lstrip()
        if stripped.startswith(self.start) or stripped.startswith("{"):
            return len(text) - len(stripped)
        return -1

    def _calls(self, text: str) -> list[ToolCall]:
        return [_call(o) for o in _json_objects(text.strip().removeprefix(self.start))]


class MistralParser(ToolParser):
    """Mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` or the newer `[TOOL_CALLS]name[ARGS]{...}`."""

    name, start = "mistral", "[TOOL_CALLS]"

    def _calls(self, text: str) -> list[ToolCall]:
        calls = []
        for part in text.split(self.start)[1:]:
            part = part.strip()
            if "[ARGS]" in part and not part.startswith("["):
                name, arguments = part.split("[ARGS]", 1)
                calls.append(_call({"name": name.strip(), "arguments": json.loads(arguments)}))
                continue
            for value in _json_objects(part):
                calls += [_call(v) for v in (value if isinstance(value, list) else [value])]
        return calls


PARSERS = {p.name: p for p in (HermesParser, Llama3JsonParser, MistralParser)}


def get_tool_parser(name: str) -> ToolParser:
    from lmforge.errors import LmforgeError

    if name not in PARSERS:
        raise LmforgeError(f"--tool-call-parser {name!r} is not known; choose one of {', '.join(sorted(PARSERS))}")
    return PARSERS[name]()


class ToolStream:
    """One streamed choice's content deltas -> (content delta, OpenAI `tool_calls` deltas). Named functions stream
    their arguments as they come; `required` and parsed `auto` calls are sent whole when the choice ends (text from
    a parser's start marker on is held until then; malformed calls are released as content)."""

    def __init__(self, plan: ToolPlan, parser: ToolParser | None):
        self.plan, self.parser = plan, parser if plan.mode == "auto" else None
        self.text, self.sent = "", 0
        self.call = ToolCall(plan.name, "") if plan.mode == "named" else None
        self.num_calls = 0

    def feed(self, delta: str, finished: bool) -> tuple[str, list[dict]]:
        self.text += delta
        mode = self.plan.mode
        if self.call is not None:  # named: the text is the arguments
            if not self.num_calls:
                self.num_calls = 1
                return "", [{**self.call.to_dict(0), "function": {"name": self.call.name, "arguments": delta}}]
            return "", [{"index": 0, "function": {"arguments": delta}}] if delta else []
        if mode == "required" or (self.parser is not None and self.parser.find_start(self.text) >= 0):
            if not finished:
                at = self.parser.find_start(self.text) if self.parser is not None else 0
                return self._release(max(at, self.sent)), []
            content, calls = self.plan.calls(self.text, self.parser)
            self.num_calls = len(calls)
            if not calls:
                return self._release(len(self.text)), []
            return "", [c.to_dict(i) for i, c in enumerate(calls)]
        if self.parser is None or finished:
            return self._release(len(self.text)), []
        return self._release(len(self.text) - _marker_overlap(self.text, self.parser)), []

    def _release(self, upto: int) -> str:
        piece = self.text[self.sent:upto]
        self.sent = max(self.sent, upto)
        return piece


def _marker_overlap(text: str, parser: ToolParser) -> int:
    """How many trailing characters of text could begin the parser's marker (held back until they cannot)."""
    if isinstance(parser, Llama3JsonParser) and not text.strip():
        return len(text)  # a call may yet start the output
    return max((k for k in range(1, len(parser.start)) if text.endswith(parser.start[:k])), default=0)
