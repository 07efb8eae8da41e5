"""OpenAI's error shape, {"error": {"message", "type", "param", "code"}}, for every failure the server answers."""

import json

from pydantic import ValidationError
from starlette.responses import JSONResponse

# How pydantic's error types read as one sentence (the rest use pydantic's own message).
_MISSING = "missing"
_EXTRA = "extra_forbidden"


class APIError(Exception):
    """A request the server refuses: the status, one sentence, and the request field at fault (when there is one)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)

    async def __call__(self, scope, receive, send) -> None:  # as an ASGI app, for middleware that refuses early
        await self.response()(scope, receive, send)


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param)


def param_path(loc: tuple) -> str:
    """('messages', 0, 'role') -> 'messages[0].role', as OpenAI names nested fields."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def from_validation(error: ValidationError) -> APIError:
    """The first problem pydantic found, as a 400 naming the field."""
    first = error.errors(include_url=False)[0]
    param = param_path(first["loc"]) or None
    if first["type"] == _MISSING:
        return bad_request(f"Missing required parameter: '{param}'.", param)
    if first["type"] == _EXTRA:
        return bad_request(f"Unrecognized request argument supplied: {param}", param)
    got = first.get("input")
    if first["type"] == "too_short" and not got:
        return bad_request(f"Invalid value for '{param}': must not be empty.", param)
    message = first["msg"].removeprefix("Value error, ")
    if isinstance(got, (str, int, float, bool, type(None))):  # show what was sent when it is short to show
        message += f" (got {json.dumps(got)[:80]})"
    return bad_request(f"Invalid value for '{param}': {message}.", param)


def parse_json(body: bytes) -> dict:
    """The request body as a JSON object, or a 400 that says what is wrong with it."""
    if not body:
        raise bad_request("The request body is empty; send a JSON object.")
    try:
        data = json.loads(body)
    except UnicodeDecodeError:
        raise bad_request("The request body is not UTF-8 text; send a JSON object.") from None
    except RecursionError:
        raise bad_request("The request body nests JSON too deeply.") from None
    except json.JSONDecodeError as e:
        raise bad_request(f"The request body is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}).") \
            from None
    if not isinstance(data, dict):
        raise bad_request(f"The request body must be a JSON object, got a JSON {type(data).__name__}.")
    if b"\\u" in body:  # only an escape can smuggle in an unpaired surrogate
        try:
            path = _lone_surrogate(data)
        except RecursionError:
            raise bad_request("The request body nests JSON too deeply.") from None
        if path is not None:
            raise bad_request(f"Invalid value for '{path}': it holds an unpaired UTF-16 surrogate escape, which is "
                              "not text.", path)
    return data


def _lone_surrogate(value, path: str = "") -> str | None:
    """Where in the parsed JSON a string holds an unpaired surrogate (json accepts "\\ud800"; tokenizers cannot)."""
    if isinstance(value, str):
        return None if _is_text(value) else (path or "body")
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if isinstance(key, str) and not _is_text(key):
            return path or "body"  # a key cannot be named in the message without the surrogate itself
        where = f"{path}[{key}]" if isinstance(key, int) else (f"{path}.{key}" if path else key)
        if (found := _lone_surrogate(item, where)) is not None:
            return found
    return None


def _is_text(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
