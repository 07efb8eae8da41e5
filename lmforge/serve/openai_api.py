"""The OpenAI-compatible HTTP server: a FastAPI app on an AsyncEngine.

`create_app(engine, ...)` builds the app; `lmforge serve` runs it under uvicorn. Every failure is answered in
OpenAI's error shape with the right status; a user's input never produces a 500.
"""

import asyncio
import hmac
import logging
import os
import time

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lmforge import __version__
from lmforge.engine.async_engine import AsyncEngine
from lmforge.serve.adapters import load_lora_adapter, unload_lora_adapter
from lmforge.serve.chat import create_chat_completion
from lmforge.serve.completions import create_completion
from lmforge.serve.errors import APIError, bad_request, from_validation, param_path, parse_json
from lmforge.serve.inputs import chat_prompt, check_completion_prompts, check_prompt_size, check_token_ids
from lmforge.serve.metrics import CONTENT_TYPE, ServerMetrics
from lmforge.serve.models import ServedModels
from lmforge.serve.openapi import VersionResponse, answers, build_openapi
from lmforge.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    LoadLoRAAdapterRequest,
    TokenizeRequest,
    UnloadLoRAAdapterRequest,
)
from lmforge.serve.reasoning import get_reasoning_parser
from lmforge.serve.responses import (
    ChatCompletionChunk,
    ChatCompletionResponse,
    CompletionResponse,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeResponse,
    TokenizerInfoResponse,
)
from lmforge.serve.state import ServerState
from lmforge.serve.tools import get_tool_parser
from lmforge.web.assets import add_asset_routes
from lmforge.web.dashboard import add_runs_api

log = logging.getLogger("lmforge")

DEFAULT_MAX_BODY_BYTES = 16 * 2**20  # far above any prompt that fits a context window, far below a memory problem
# seconds from a request's head to the end of its body: a 16 MiB body at 300 kB/s; a client trickling its body
# (slow-loris after the headers, which --header-timeout does not cover) is answered 408 and disconnected then
DEFAULT_BODY_TIMEOUT = 60.0
# --api-key guards the OpenAI routes (as vLLM) and the tokenizer's, which would otherwise run anyone's text through
# the server, and the run dashboard's data (--runs); health, metrics, version, the API's schema and the web pages'
# files stay open.
PROTECTED_PREFIXES = ("/v1/", "/api/")
PROTECTED_PATHS = ("/tokenize", "/detokenize", "/tokenizer_info")


def is_protected(path: str) -> bool:
    """Whether --api-key guards the route at `path`."""
    return path.startswith(PROTECTED_PREFIXES) or path in PROTECTED_PATHS


def create_app(engine: AsyncEngine, served_model_names: list[str] | None = None, *, model_root: str = "",
               chat_template: str | None = None, api_key: str | None = None, max_queue: int | None = None,
               cors_origins: list[str] | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               body_timeout: float = DEFAULT_BODY_TIMEOUT,
               allow_runtime_lora_updating: bool = False, allowed_lora_paths: list[str] | None = None,
               enable_tokenizer_info_endpoint: bool = False, enable_auto_tool_choice: bool = False,
               tool_call_parser: str | None = None, ui: bool = True, runs_dir: str | None = None) -> FastAPI:
    """`allow_runtime_lora_updating` serves /v1/load_lora_adapter and /v1/unload_lora_adapter, reading adapters
    from under `allowed_lora_paths` only when given; `enable_tokenizer_info_endpoint` serves /tokenizer_info; `ui`
    serves the chat playground (lmforge/web/) at /, `runs_dir` the run dashboard at /runs. The reasoning parser is
    the engine's (EngineConfig.reasoning_parser), which starts grammars after the thinking."""
    names = served_model_names or [model_root or "default"]
    models = ServedModels(names, model_root, engine.engine.max_model_len)
    for adapter in engine.engine.list_loras():  # loaded before the app (lmforge serve --lora): routes from the start
        models.add_adapter(adapter.request)
    roots = None if allowed_lora_paths is None else [os.path.realpath(p) for p in allowed_lora_paths]
    reasoning = engine.engine.config.reasoning_parser
    state = ServerState(engine, models, ServerMetrics(names[0]), chat_template, max_queue,
                        allow_runtime_lora_updating, roots,
                        tool_parser=get_tool_parser(tool_call_parser) if tool_call_parser else None,
                        auto_tools=enable_auto_tool_choice,
                        reasoning=get_reasoning_parser(reasoning) if reasoning else None)
    app = FastAPI(title="lmforge", version=__version__, docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.state.lmforge = state
    _add_error_handlers(app)
    _add_routes(app, state, enable_tokenizer_info_endpoint)
    if runs_dir is not None:
        add_runs_api(app, runs_dir, refresh_s=2.0)
    if ui or runs_dir is not None:
        add_asset_routes(app, "playground.html" if ui else None, {"/runs": "dashboard.html"} if runs_dir else None)
    app.openapi = lambda: build_openapi(app, api_key is not None, is_protected, state.vocab_size)
    app.add_middleware(Gatekeeper, api_key=api_key, max_body_bytes=max_body_bytes, body_timeout=body_timeout)
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


def _add_routes(app: FastAPI, state: ServerState, tokenizer_info: bool) -> None:
    @app.post("/v1/chat/completions", responses=answers(ChatCompletionResponse, 400, 404, 503,
                                                                   streamed=ChatCompletionChunk))
    async def chat_completions(request: Request) -> Response:
        arrival = time.monotonic()
        req: ChatCompletionRequest = await _parse(request, ChatCompletionRequest)
        check_prompt_size(req.messages, state.max_prompt_chars, state.max_model_len, "messages")
        return await create_chat_completion(state, req, request, arrival)

    @app.post("/v1/completions", responses=answers(CompletionResponse, 400, 404, 503, streamed=CompletionResponse))
    async def completions(request: Request) -> Response:
        arrival = time.monotonic()
        req: CompletionRequest = await _parse(request, CompletionRequest)
        check_completion_prompts(req, state.max_prompt_chars, state.max_model_len)
        return await create_completion(state, req, request, arrival)

    @app.get("/v1/models", responses=answers(ModelList))
    async def list_models() -> JSONResponse:
        return JSONResponse(ModelList(data=state.models.cards()).model_dump(mode="json"))

    @app.get("/v1/models/{name:path}", responses=answers(ModelCard, 404))
    async def retrieve_model(name: str) -> JSONResponse:
        state.models.resolve(name)
        card = next(c for c in state.models.cards() if c.id == name)
        return JSONResponse(card.model_dump(mode="json"))

    # Off unless the operator turns run-time loading on: then in the schema too (vLLM registers them only then).
    runtime_lora = state.allow_runtime_lora_updating

    @app.post("/v1/load_lora_adapter", include_in_schema=runtime_lora, response_class=PlainTextResponse,
              responses=answers(None, 400, media_type="text/plain"))
    async def load_lora(request: Request) -> Response:
        return await load_lora_adapter(state, await _parse(request, LoadLoRAAdapterRequest))

    @app.post("/v1/unload_lora_adapter", include_in_schema=runtime_lora, response_class=PlainTextResponse,
              responses=answers(None, 400, 404, 409, media_type="text/plain"))
    async def unload_lora(request: Request) -> Response:
        return await unload_lora_adapter(state, await _parse(request, UnloadLoRAAdapterRequest))

    @app.get("/health", response_class=Response, responses=answers(None, 503))  # 200: no body (as vLLM)
    async def health() -> Response:
        if not state.engine.is_alive:
            raise APIError(503, "The engine is not running.", code="engine_dead")
        return Response(status_code=200)

    @app.get("/version", responses=answers(VersionResponse))
    async def version() -> JSONResponse:
        return JSONResponse({"version": __version__})

    @app.get("/metrics", response_class=PlainTextResponse, responses=answers(None, media_type="text/plain"))
    async def metrics() -> Response:
        return Response(await state.metrics.render(state.engine), media_type=CONTENT_TYPE)

    @app.post("/tokenize", responses=answers(TokenizeResponse, 400, 404))
    async def tokenize(request: Request) -> JSONResponse:
        req: TokenizeRequest = await _parse(request, TokenizeRequest)
        state.models.resolve(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise bad_request("Send exactly one of 'prompt' (text) or 'messages' (a chat).", "prompt")
        if req.messages is not None:
            if not req.messages:
                raise bad_request("messages must not be empty.", "messages")
            check_prompt_size(req.messages, state.max_prompt_chars, state.max_model_len, "messages")
            ids = await asyncio.to_thread(chat_prompt, state.tokenizer, req.messages, state.chat_template,
                                          req.add_generation_prompt, req.chat_template_kwargs)
        else:
            check_prompt_size(req.prompt, state.max_prompt_chars, state.max_model_len, "prompt")
            add = True if req.add_special_tokens is None else req.add_special_tokens
            ids = await asyncio.to_thread(state.tokenizer.encode, req.prompt, add_special_tokens=add)
        return JSONResponse(TokenizeResponse(count=len(ids), max_model_len=state.max_model_len,
                                             tokens=ids).model_dump())

    @app.post("/detokenize", responses=answers(DetokenizeResponse, 400, 404))
    async def detokenize(request: Request) -> JSONResponse:
        req: DetokenizeRequest = await _parse(request, DetokenizeRequest)
        state.models.resolve(req.model)
        if len(req.tokens) > state.max_model_len:  # as vLLM: no more than a context's worth
            raise bad_request(f"At most {state.max_model_len} tokens (the maximum context length) can be "
                              f"detokenized at once, got {len(req.tokens)}.", "tokens")
        check_token_ids(req.tokens, state.vocab_size, "tokens")
        text = await asyncio.to_thread(state.tokenizer.decode, req.tokens)
        return JSONResponse(DetokenizeResponse(prompt=text).model_dump())

    if tokenizer_info:  # as vLLM: only with --enable-tokenizer-info-endpoint (it shows the chat template)
        @app.get("/tokenizer_info", responses=answers(TokenizerInfoResponse))
        async def get_tokenizer_info() -> JSONResponse:
            return JSONResponse(_tokenizer_info(state).model_dump())


def _tokenizer_info(state: ServerState) -> TokenizerInfoResponse:
    """What tokenizer_config.json says that a client needs to tokenise as the server does."""
    tok = state.tokenizer
    return TokenizerInfoResponse(tokenizer_class="PreTrainedTokenizerFast", **tok.special_tokens,
                                 model_max_length=state.max_model_len, vocab_size=tok.vocab_size,
                                 add_bos_token=tok.add_bos_token, eos_token_ids=sorted(tok.eos_token_ids),
                                 chat_template=state.chat_template or tok.chat_template)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_parameter(_: Request, e: RequestValidationError) -> JSONResponse:  # 400, as for bodies
        first = e.errors()[0]
        param = param_path(tuple(first["loc"][1:])) or None  # without FastAPI's 'path'/'query' in front
        return bad_request(f"Invalid value for '{param}': {first['msg']}.", param).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        if e.status_code == 404:
            return APIError(404, f"Unknown route: {request.method} {request.url.path}.", code="not_found").response()
        if e.status_code == 405:  # Starlette names the allowed methods in an Allow header, as HTTP requires
            return APIError(405, f"Method {request.method} is not allowed on {request.url.path}.",
                            code="method_not_allowed", headers=e.headers).response()
        return APIError(e.status_code, str(e.detail)).response()

    @app.exception_handler(Exception)
    async def internal_error(_: Request, e: Exception) -> JSONResponse:  # a server bug: logged with its traceback
        log.exception("internal error while serving a request")
        return APIError(500, f"Internal server error ({type(e).__name__}); see the server log.").response()


class Gatekeeper:
    """Pure ASGI (streaming-safe): the API key on /v1/ routes, then the body-size limit and deadline. The body is
    read here once, up to the limit and within `body_timeout` seconds, and replayed to the app; after it, receive()
    reports the client's disconnect."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int, body_timeout: float):
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        path = scope["path"]
        if self.api_key is not None and is_protected(path) and scope["method"] != "OPTIONS":
            given = headers.get("authorization", "")
            token = given[7:] if given[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(token.encode(), self.api_key.encode()):
                reason = "No API key provided" if not given else "Incorrect API key provided"
                return await APIError(401, f"{reason}; send 'Authorization: Bearer <key>'.",
                                      code="invalid_api_key")(scope, receive, send)
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return await self._too_large(scope, receive, send)
        try:
            async with asyncio.timeout(self.body_timeout):
                body = await self._read_body(receive)
        except TimeoutError:  # Connection: close, or uvicorn would keep reading the trickle after the answer
            return await APIError(408, f"The request body did not arrive within {self.body_timeout:g} s of the "
                                  "request's headers.", code="request_timeout",
                                  headers={"Connection": "close"})(scope, receive, send)
        if body is None:  # the client left while sending
            return
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

    async def _read_body(self, receive: Receive) -> bytes | None:
        """The whole body; None if the client left; any bytes beyond the limit once the limit is passed."""
        chunks, size, more = [], 0, True
        while more and size <= self.max_body_bytes:
            message = await receive()
            if message["type"] != "http.request":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
        return b"".join(chunks)  # once: appending chunk by chunk would copy a large body hundreds of times

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        await APIError(413, f"The request body exceeds {self.max_body_bytes} bytes.",
                       code="request_too_large")(scope, receive, send)
