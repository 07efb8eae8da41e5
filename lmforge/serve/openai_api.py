"""The OpenAI-compatible HTTP server: a FastAPI app on an AsyncEngine.

`create_app(engine, ...)` builds the app; `lmforge serve` runs it under uvicorn. Every failure is answered in
OpenAI's error shape with the right status; a user's input never produces a 500.
"""

import hmac
import logging
import time

from fastapi import FastAPI
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lmforge import __version__
from lmforge.engine.async_engine import AsyncEngine
from lmforge.serve.adapters import load_lora_adapter, unload_lora_adapter
from lmforge.serve.chat import create_chat_completion
from lmforge.serve.completions import create_completion
from lmforge.serve.errors import APIError, bad_request, from_validation, parse_json
from lmforge.serve.inputs import chat_prompt, check_token_ids
from lmforge.serve.metrics import CONTENT_TYPE, ServerMetrics
from lmforge.serve.models import ServedModels
from lmforge.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    LoadLoRAAdapterRequest,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    UnloadLoRAAdapterRequest,
)
from lmforge.serve.reasoning import get_reasoning_parser
from lmforge.serve.state import ServerState
from lmforge.serve.tools import get_tool_parser

log = logging.getLogger("lmforge")

DEFAULT_MAX_BODY_BYTES = 16 * 2**20  # far above any prompt that fits a context window, far below a memory problem
PROTECTED_PREFIX = "/v1/"  # as vLLM: --api-key guards the OpenAI routes; health, metrics and version stay open


def create_app(engine: AsyncEngine, served_model_names: list[str] | None = None, *, model_root: str = "",
               chat_template: str | None = None, api_key: str | None = None, max_queue: int | None = None,
               cors_origins: list[str] | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               enable_auto_tool_choice: bool = False, tool_call_parser: str | None = None) -> FastAPI:
    """The app; the reasoning parser is the engine's (EngineConfig.reasoning_parser), which starts grammars after
    the thinking."""
    names = served_model_names or [model_root or "default"]
    models = ServedModels(names, model_root, engine.engine.max_model_len)
    for adapter in engine.engine.list_loras():  # loaded before the app (lmforge serve --lora): routes from the start
        models.add_adapter(adapter.request)
    reasoning = engine.engine.config.reasoning_parser
    state = ServerState(engine, models, ServerMetrics(names[0]), chat_template, max_queue,
                        get_tool_parser(tool_call_parser) if tool_call_parser else None, enable_auto_tool_choice,
                        get_reasoning_parser(reasoning) if reasoning else None)
    app = FastAPI(title="lmforge", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.lmforge = state
    _add_error_handlers(app)
    _add_routes(app, state)
    app.add_middleware(Gatekeeper, api_key=api_key, max_body_bytes=max_body_bytes)
    if cors_origins:  # outermost, so browsers' preflight requests are answered before the key check
        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["*"], allow_headers=["*"],
                           allow_credentials="*" not in cors_origins)
    return app


async def _parse(request: Request, model: type[BaseModel]):
    data = parse_json(await request.body())
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise from_validation(e) from None


def _add_routes(app: FastAPI, state: ServerState) -> None:
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        arrival = time.monotonic()
        return await create_chat_completion(state, await _parse(request, ChatCompletionRequest), request, arrival)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        arrival = time.monotonic()
        return await create_completion(state, await _parse(request, CompletionRequest), request, arrival)

    @app.get("/v1/models")
    async def list_models() -> JSONResponse:
        return JSONResponse(ModelList(data=state.models.cards()).model_dump(mode="json"))

    @app.get("/v1/models/{name:path}")
    async def retrieve_model(name: str) -> JSONResponse:
        state.models.resolve(name)
        card = next(c for c in state.models.cards() if c.id == name)
        return JSONResponse(card.model_dump(mode="json"))

    @app.post("/v1/load_lora_adapter")
    async def load_lora(request: Request) -> Response:
        return await load_lora_adapter(state, await _parse(request, LoadLoRAAdapterRequest))

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora(request: Request) -> Response:
        return await unload_lora_adapter(state, await _parse(request, UnloadLoRAAdapterRequest))

    @app.get("/health")
    async def health() -> Response:
        if not state.engine.is_alive:
            raise APIError(503, "The engine is not running.", code="engine_dead")
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> JSONResponse:
        return JSONResponse({"version": __version__})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(await state.metrics.render(state.engine), media_type=CONTENT_TYPE)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> JSONResponse:
        req: TokenizeRequest = await _parse(request, TokenizeRequest)
        state.models.resolve(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise bad_request("Send exactly one of 'prompt' (text) or 'messages' (a chat).", "prompt")
        if req.messages is not None:
            if not req.messages:
                raise bad_request("messages must not be empty.", "messages")
            ids = chat_prompt(state.tokenizer, req.messages, state.chat_template, req.add_generation_prompt, None)
        else:
            add = True if req.add_special_tokens is None else req.add_special_tokens
            ids = state.tokenizer.encode(req.prompt, add_special_tokens=add)
        return JSONResponse(TokenizeResponse(count=len(ids), max_model_len=state.max_model_len,
                                             tokens=ids).model_dump())

    @app.post("/detokenize")
    async def detokenize(request: Request) -> JSONResponse:
        req: DetokenizeRequest = await _parse(request, DetokenizeRequest)
        state.models.resolve(req.model)
        check_token_ids(req.tokens, state.vocab_size, "tokens")
        return JSONResponse(DetokenizeResponse(prompt=state.tokenizer.decode(req.tokens)).model_dump())


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        if e.status_code == 404:
            return APIError(404, f"Unknown route: {request.method} {request.url.path}.", code="not_found").response()
        if e.status_code == 405:
            return APIError(405, f"Method {request.method} is not allowed on {request.url.path}.",
                            code="method_not_allowed").response()
        return APIError(e.status_code, str(e.detail)).response()

    @app.exception_handler(Exception)
    async def internal_error(_: Request, e: Exception) -> JSONResponse:  # a server bug: logged with its traceback
        log.exception("internal error while serving a request")
        return APIError(500, f"Internal server error ({type(e).__name__}); see the server log.").response()


class Gatekeeper:
    """Pure ASGI (streaming-safe): the API key on /v1/ routes, then the body-size limit. The body is read here
    once, up to the limit, and replayed to the app; after it, receive() reports the client's disconnect."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int):
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key is not None and scope["path"].startswith(PROTECTED_PREFIX) and scope["method"] != "OPTIONS":
            given = headers.get("authorization", "")
            token = given[7:] if given[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(token.encode(), self.api_key.encode()):
                reason = "No API key provided" if not given else "Incorrect API key provided"
                return await APIError(401, f"{reason}; send 'Authorization: Bearer <key>'.",
                                      code="invalid_api_key")(scope, receive, send)
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return await self._too_large(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left while sending
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body_bytes:
                return await self._too_large(scope, receive, send)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        await APIError(413, f"The request body exceeds {self.max_body_bytes} bytes.",
                       code="request_too_large")(scope, receive, send)
