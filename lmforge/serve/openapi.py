"""The API's schema at /openapi.json, as exact as the answers: each route's request body (the routes parse their own,
for the errors), its 200 body, and every error status it can give with OpenAI's error body. Clients generate code
from it and fuzzers (tests/unit/test_serve_fuzz.py) hold the server to it."""

import copy
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from lmforge.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    LoadLoRAAdapterRequest,
    TokenizeRequest,
    UnloadLoRAAdapterRequest,
)
from lmforge.serve.responses import ChatCompletionChunk, CompletionResponse

BODIES = {"/v1/chat/completions": ChatCompletionRequest, "/v1/completions": CompletionRequest,
          "/tokenize": TokenizeRequest, "/detokenize": DetokenizeRequest,
          "/v1/load_lora_adapter": LoadLoRAAdapterRequest, "/v1/unload_lora_adapter": UnloadLoRAAdapterRequest}
# The chunks of the routes' event streams (their schemas are referenced from the streams' event schema).
STREAMED = (ChatCompletionChunk, CompletionResponse)

# When each error status is given (the body is always ErrorResponse).
WHY = {
    400: "The request is invalid; `error.param` names the field at fault when there is one.",
    401: "The API key is missing or wrong (the server was started with --api-key).",
    404: "The model (or LoRA adapter) the request names is not served.",
    409: "The adapter is still generating for requests; unload it when they are done.",
    408: "The request body did not arrive in time (see --body-timeout).",
    413: "The request body is larger than the server accepts.",
    503: "The server is busy (see the Retry-After header), shutting down, or its engine has stopped.",
}


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error body, for every status other than 200."""

    error: ErrorInfo


class VersionResponse(BaseModel):
    version: str


# Written out (not FastAPI's "model"), which would give an error the media type of the route's 200.
ERROR_BODY = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}


def answers(model: type[BaseModel] | None, *errors: int, media_type: str | None = None,
            streamed: type[BaseModel] | None = None) -> dict:
    """A route's `responses`: its 200 (`model` as JSON, a `media_type` text, or no body; with `streamed`, the
    server-sent events of `streamed` chunks a `stream: true` request gets instead) and its error statuses (with
    408 and 413 wherever a body is read: every route that takes one)."""
    ok: dict[str, Any] = {"description": "Success"}
    if model is not None:
        ok["model"] = model
    elif media_type is not None:
        ok["content"] = {media_type: {"schema": {"type": "string"}}}
    if streamed is not None:
        ok["content"] = {"text/event-stream": {"schema": event_schema(streamed)}}
    out: dict[int | str, dict] = {200: ok}
    for status in sorted({*errors, *((408, 413) if 400 in errors else ())}):
        out[status] = {"description": WHY[status], **ERROR_BODY}
    return out


def event_schema(chunk: type[BaseModel]) -> dict:
    """One event of a stream, as OpenAPI before 3.2 describes an event stream (its `schema` is each event's): the
    data of each is a JSON `chunk`, or the error that ends a stream cut short (shutdown), or the final [DONE]."""
    json_data = {"type": "string", "contentMediaType": "application/json", "contentSchema": {"anyOf": [
        {"$ref": f"#/components/schemas/{chunk.__name__}"}, {"$ref": "#/components/schemas/ErrorResponse"}]}}
    return {"type": "object", "required": ["data"],
            "properties": {"data": {"anyOf": [{"const": "[DONE]"}, json_data]}}}


def build_openapi(app: FastAPI, keyed: bool, protected: Callable[[str], bool], vocab_size: int) -> dict:
    """FastAPI's schema of the app, plus: the request bodies of BODIES, their token ids below `vocab_size`; with an
    API key (`keyed`), a bearer security scheme and a 401 on every route whose path is `protected`. FastAPI's 422
    is dropped: the server answers invalid requests with 400 (see openai_api._add_error_handlers)."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    components = schema.setdefault("components", {})
    models = components.setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        models.pop(name, None)
    if keyed:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    for model in (ErrorResponse, *STREAMED):
        _add_model(models, model)
    for path, operations in schema["paths"].items():
        for operation in operations.values():
            operation["responses"].pop("422", None)
            if keyed and protected(path):
                operation["security"] = [{"bearer": []}]
                operation["responses"]["401"] = {"description": WHY[401], **ERROR_BODY}
            if (model := BODIES.get(path)) is not None:
                _add_model(models, model)
                operation["requestBody"] = {"required": True, "content": {"application/json": {
                    "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
    _bound_token_ids(models, vocab_size)
    app.openapi_schema = schema
    return schema


def _add_model(components: dict, model: type[BaseModel]) -> None:
    # a copy: _bound_token_ids edits it, and the field schemas it is built from are module constants
    body = copy.deepcopy(model.model_json_schema(ref_template="#/components/schemas/{model}"))
    components.update(body.pop("$defs", {}))
    components[model.__name__] = body


def _bound_token_ids(node: Any, vocab_size: int) -> None:
    """Every token-id schema (protocol.TOKEN_ID_SCHEMA) in `node`, given this model's vocabulary as its range."""
    if isinstance(node, dict):
        if node.pop("x-token-id", False):
            node["maximum"] = vocab_size - 1
        for value in node.values():
            _bound_token_ids(value, vocab_size)
    elif isinstance(node, list):
        for value in node:
            _bound_token_ids(value, vocab_size)
