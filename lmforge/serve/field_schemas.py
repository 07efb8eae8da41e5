"""JSON schemas of the request fields that protocol.py takes as free-form values (`Any`, `dict`) because their
checks are written by hand, for errors that name the field (protocol.py's validators, serve/tools.py,
serve/constraints.py, the chat template). These describe what those checks let through, so the schema at
/openapi.json tells clients (and the fuzzer, tests/unit/test_serve_fuzz.py) what the server accepts."""

# A token id. The served schema gives its maximum: serve/openapi.py fills in the model's vocabulary size where it
# finds the marker.
TOKEN_ID_SCHEMA = {"type": "integer", "minimum": 0, "x-token-id": True}
_TEXT = {"type": "string", "minLength": 1}
_TOKENS = {"type": "array", "items": TOKEN_ID_SCHEMA, "minItems": 1}
STOP_SCHEMA = {"anyOf": [_TEXT, {"type": "array", "items": _TEXT, "maxItems": 1024}, {"type": "null"}]}
PROMPT_SCHEMA = {"anyOf": [_TEXT, _TOKENS, {"type": "array", "items": {"anyOf": [_TEXT, _TOKENS]}, "minItems": 1}]}
LOGIT_BIAS_SCHEMA = {"anyOf": [{"type": "null"}, {"type": "object", "propertyNames": {"pattern": "^[0-9]{1,19}$"},
                                                  "additionalProperties": {"type": "number", "minimum": -100,
                                                                           "maximum": 100}}]}
_TEXT_PART = {"type": "object", "additionalProperties": False, "required": ["type", "text"],
              "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}
CONTENT_SCHEMA = {"anyOf": [{"type": "string"}, {"type": "array", "items": _TEXT_PART}, {"type": "null"}]}
# A message needs content unless it carries tool calls (lmforge/tokenizer/chat_template.py)
MESSAGE_SCHEMA = {"anyOf": [{"required": ["content"], "properties": {"content": {"not": {"type": "null"}}}},
                            {"required": ["tool_calls"], "properties": {"tool_calls": {"type": "array"}}}]}
_FUNCTION = {"type": "object", "additionalProperties": False, "required": ["name"], "properties": {
    "name": {"type": "string", "pattern": "^[a-zA-Z0-9_.:-]{1,64}$"}, "description": {"type": "string"},
    "parameters": {"type": "object", "properties": {"type": {"const": "object"}}, "required": ["type"]},
    "strict": {"type": "boolean"}}}
TOOLS_SCHEMA = {"anyOf": [{"type": "array", "items": {
    "type": "object", "required": ["type", "function"], "properties": {"type": {"const": "function"},
                                                                       "function": _FUNCTION}}}, {"type": "null"}]}
TOOL_CHOICE_SCHEMA = {"anyOf": [{"enum": ["none", "auto", "required", None]}, {
    "type": "object", "required": ["type", "function"], "properties": {
        "type": {"const": "function"},
        "function": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}}}]}
RESPONSE_FORMAT_SCHEMA = {"anyOf": [{"type": "null"}, {
    "type": "object", "additionalProperties": False, "required": ["type"],
    "properties": {"type": {"enum": ["text", "json_object"]}}}, {
    "type": "object", "additionalProperties": False, "required": ["type", "json_schema"], "properties": {
        "type": {"const": "json_schema"},
        "json_schema": {"type": "object", "additionalProperties": False, "properties": {
            "name": {"type": "string"}, "description": {"type": "string"}, "schema": {"type": "object"},
            "strict": {"type": ["boolean", "null"]}}}}}]}
# exactly one constraint, and the options (serve/constraints.py)
STRUCTURED_OUTPUTS_SCHEMA = {"anyOf": [{"type": "null"}, {
    "type": "object", "additionalProperties": False, "properties": {
        "json": {"anyOf": [{"type": "object"}, {"type": "string"}]}, "regex": _TEXT,
        "choice": {"type": "array", "items": _TEXT, "minItems": 1}, "grammar": _TEXT,
        "json_object": {"const": True}, "disable_any_whitespace": {"type": "boolean"},
        "disable_additional_properties": {"type": "boolean"}},
    "oneOf": [{"required": [name]} for name in ("json", "regex", "choice", "grammar", "json_object")]}]}
