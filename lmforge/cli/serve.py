"""lmforge serve: the OpenAI-compatible HTTP server (lmforge/serve/) on the engine, under uvicorn."""

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import socket
from pathlib import Path

from lmforge.cli.engine_args import add_engine_args, engine_config
from lmforge.errors import LmforgeError

log = logging.getLogger("lmforge")


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                       description="Serve MODEL over OpenAI's HTTP API (/v1/chat/completions, /v1/completions, "
                                   "/v1/models) with streaming, plus /health, /version, /metrics (Prometheus), "
                                   "/tokenize and /detokenize, and PEFT LoRA adapters as models of their own "
                                   "(--lora), and a chat playground page at / (--no-ui: none). SIGTERM or Ctrl-C "
                                   "stops accepting requests and lets those in flight finish (up to "
                                   "--shutdown-timeout).")
    p.add_argument("model_arg", nargs="?", metavar="MODEL", help="the model (same as --model)")
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    g.add_argument("--port", type=int, default=8000, help="port to listen on; 0 picks a free one (default 8000)")
    g.add_argument("--served-model-name", nargs="+", metavar="NAME",
                   help="name(s) clients use in `model` (default: the MODEL argument as given)")
    g.add_argument("--chat-template", metavar="FILE_OR_TEXT",
                   help="a Jinja chat template file, Jinja text, or the name of one of the model's own templates; "
                        "overrides the model's default")
    g.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/ routes (default: $LMFORGE_API_KEY, else none)")
    g.add_argument("--data-parallel-size", "-dp", type=int, default=1, metavar="N",
                   help="N engine replicas in this process, each a whole model with its own KV cache and as many "
                   "threads as this process (OMP_NUM_THREADS); requests balanced by load with prefix-cache affinity "
                   "(default 1)")
    g.add_argument("--max-queue", type=int, default=None, metavar="N",
                   help="answer 503 + Retry-After when N sequences already wait for a slot (default: no limit)")
    g.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="on SIGTERM/SIGINT, how long requests in flight may take to finish; those still running "
                        "then end with an error (streams: an error event and [DONE]) (default 30)")
    g.add_argument("--header-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="close connections that have not sent a whole request line and headers this long after "
                        "opening or after their previous response (slow clients) (default 10)")
    g.add_argument("--body-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="answer 408 and close connections whose request body has not all arrived this long after "
                        "its headers (clients trickling their body) (default 60)")
    g.add_argument("--enable-tokenizer-info-endpoint", action="store_true",
                   help="serve GET /tokenizer_info (special tokens, chat template), as vLLM's flag does")
    g.add_argument("--cors", nargs="?", const="*", default=None, metavar="ORIGINS",
                   help="allow cross-origin requests from these comma-separated origins (bare --cors: any origin)")
    g.add_argument("--no-access-log", action="store_true", help="do not log one line per HTTP request")
    g.add_argument("--no-ui", action="store_true", help="do not serve the chat playground page at /")
    g.add_argument("--runs", metavar="DIR", help="also serve the run dashboard of the training runs under DIR at /runs "
                   "(as `lmforge dashboard DIR`; its data needs the --api-key when there is one)")
    g = p.add_argument_group("LoRA adapters")
    g.add_argument("--lora", action="append", default=[], metavar="NAME=PATH",
                   help="serve the PEFT adapter directory PATH as model NAME, in the same batches as the base model "
                        "(repeatable; implies --enable-lora)")
    g.add_argument("--lora-modules", nargs="+", action="extend", dest="lora", metavar="NAME=PATH",
                   help="vLLM's spelling of --lora: several NAME=PATH at once")
    g.add_argument("--enable-lora", action="store_true",
                   help="reserve adapter slots even without --lora (for --allow-runtime-lora-updating)")
    g.add_argument("--allow-runtime-lora-updating", action="store_true",
                   help="serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter, which read adapter directories "
                        "named by clients (implies --enable-lora; also $VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 or "
                        "$LMFORGE_ALLOW_RUNTIME_LORA_UPDATING=1). Use with --api-key and --allowed-lora-paths")
    g.add_argument("--allowed-lora-paths", nargs="+", metavar="DIR",
                   help="run-time loading reads adapters from under these directories only (default: anywhere)")
    g.add_argument("--max-loras", type=int, default=4, metavar="N",
                   help="most adapters loaded at once; their memory is reserved at start (default 4)")
    g.add_argument("--max-lora-rank", type=int, default=16, metavar="R",
                   help="highest adapter rank accepted; lower ranks are zero-padded to it (default 16)")
    g = p.add_argument_group("tools and reasoning")
    g.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="let the model decide to call tools (tool_choice 'auto'); needs --tool-call-parser")
    g.add_argument("--tool-call-parser", choices=("hermes", "llama3_json", "mistral"), default=None,
                   help="how tool calls are written in the model's text: hermes (Hermes, Qwen 2.5/3 <tool_call>), "
                        "llama3_json (Llama 3.1+), mistral ([TOOL_CALLS])")
    g.add_argument("--reasoning-parser", choices=("deepseek_r1", "qwen3"), default=None,
                   help="put the model's <think>...</think> into reasoning_content; structured output applies after "
                        "it")
    add_engine_args(p)
    p.set_defaults(run=run)


def _chat_template(value: str | None, tokenizer) -> str | None:
    """--chat-template as a file, a template name of the model, or Jinja text; checked by rendering a greeting."""
    if value is None:
        return None
    path = Path(value)
    if path.is_file():
        template = path.read_text(encoding="utf-8")
    elif value in tokenizer.chat_templates:
        template = value
    elif "{{" in value or "{%" in value:
        template = value
    else:
        names = ", ".join(sorted(tokenizer.chat_templates)) or "none"
        raise LmforgeError(f"--chat-template {value!r} is not a file, not one of the model's templates ({names}) "
                           "and not Jinja text")
    tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                  chat_template=template)
    return template


def _lora_requests(args: argparse.Namespace, served: list[str]):
    """--lora NAME=PATH as LoRARequests, checked before the model loads as far as the files alone allow."""
    from lmforge.engine.lora_manager import LoRARequest
    from lmforge.weights.peft import read_adapter_config

    requests, names = [], set(served)
    for spec in args.lora:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise LmforgeError(f"--lora expects NAME=PATH, got {spec!r}")
        if name in names:
            raise LmforgeError(f"--lora {spec}: the name {name!r} is already served; give each adapter its own name")
        names.add(name)
        read_adapter_config(path)  # a missing or malformed adapter directory fails now, not after the model loads
        requests.append(LoRARequest(name, len(requests) + 1, path))
    if len(requests) > args.max_loras:
        raise LmforgeError(f"{len(requests)} --lora adapters exceed --max-loras {args.max_loras}; raise --max-loras")
    return requests


async def _load_adapters(engine, requests) -> None:
    for request in requests:
        await engine.add_lora(request)


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise LmforgeError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port or --host") from None
    sock.set_inheritable(True)
    return sock


def _runtime_lora(args: argparse.Namespace, api_key: str | None) -> bool:
    from lmforge.serve.adapters import runtime_updating_from_env

    allowed = args.allow_runtime_lora_updating or runtime_updating_from_env()
    for path in args.allowed_lora_paths or []:
        if not Path(path).is_dir():
            raise LmforgeError(f"--allowed-lora-paths {path}: not a directory")
    if args.allowed_lora_paths and not allowed:
        raise LmforgeError("--allowed-lora-paths confines run-time LoRA loading, which is off; add "
                           "--allow-runtime-lora-updating")
    if allowed and api_key is None:
        log.warning("run-time LoRA loading is on without --api-key: anyone who can reach this server can make it "
                    "read adapter directories%s", " under " + ", ".join(args.allowed_lora_paths)
                    if args.allowed_lora_paths else " anywhere on its file system")
    return allowed


def run(args: argparse.Namespace) -> int:
    from lmforge.engine import tp_workers
    from lmforge.engine.async_engine import AsyncEngine
    from lmforge.engine.data_parallel import DataParallelEngine
    from lmforge.serve.openai_api import create_app
    from lmforge.serve.server import serve, uvicorn_server

    if args.model_arg is not None:
        args.model = args.model_arg
    for flag, value in (("--max-queue", args.max_queue), ("--port", args.port)):
        if value is not None and value < 0:
            raise LmforgeError(f"{flag} must be >= 0, got {value}")
    if args.data_parallel_size < 1:
        raise LmforgeError(f"--data-parallel-size must be >= 1, got {args.data_parallel_size}")
    if args.shutdown_timeout < 0:
        raise LmforgeError(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}")
    for flag, value in (("--header-timeout", args.header_timeout), ("--body-timeout", args.body_timeout)):
        if not value > 0:
            raise LmforgeError(f"{flag} must be > 0, got {value}")
    api_key = args.api_key or os.environ.get("LMFORGE_API_KEY") or None
    names = args.served_model_name or [args.model]
    loras = _lora_requests(args, names)
    if args.enable_auto_tool_choice and args.tool_call_parser is None:
        raise LmforgeError("--enable-auto-tool-choice needs --tool-call-parser (hermes, llama3_json or mistral)")
    runtime_lora = _runtime_lora(args, api_key)
    if args.runs is not None and not Path(args.runs).is_dir():
        raise LmforgeError(f"--runs {args.runs}: not a directory; pass the folder your runs' output_dir are in")
    config = dataclasses.replace(engine_config(args), enable_lora=bool(loras) or args.enable_lora or runtime_lora,
                                 max_loras=args.max_loras, max_lora_rank=args.max_lora_rank,
                                 reasoning_parser=args.reasoning_parser)
    if args.data_parallel_size > 1 and args.tensor_parallel_size > 1:
        raise LmforgeError("--data-parallel-size with --tensor-parallel-size > 1 is not supported yet: the replicas "
                           "share one process, which holds one torch.distributed group; start a server per "
                           "tensor-parallel replica instead")
    if args.data_parallel_size > 1 and tp_workers.launched():
        raise LmforgeError("--data-parallel-size starts its replicas in this process; under torchrun / srun launch "
                           "one process per tensor-parallel rank without it")
    tp_workers.serve_if_launched_worker(config)  # ranks > 0 of a launch: serve rank 0's engine, exit when it stops
    engine = DataParallelEngine(config, args.data_parallel_size) if args.data_parallel_size > 1 else \
        AsyncEngine(config)
    try:
        asyncio.run(_load_adapters(engine, loras))  # an adapter that does not fit the model stops the start (exit 2)
        template = _chat_template(args.chat_template, engine.tokenizer)
        app = create_app(engine, names, model_root=str(args.model), chat_template=template, api_key=api_key,
                         max_queue=args.max_queue, body_timeout=args.body_timeout,
                         cors_origins=args.cors.split(",") if args.cors else None,
                         allow_runtime_lora_updating=runtime_lora, allowed_lora_paths=args.allowed_lora_paths,
                         enable_tokenizer_info_endpoint=args.enable_tokenizer_info_endpoint,
                         enable_auto_tool_choice=args.enable_auto_tool_choice, tool_call_parser=args.tool_call_parser,
                         ui=not args.no_ui, runs_dir=args.runs)
        sock = _listen(args.host, args.port)
        host, port = sock.getsockname()[:2]
        server = uvicorn_server(app, header_timeout=args.header_timeout, shutdown_timeout=args.shutdown_timeout,
                                access_log=not args.no_access_log, log_level=logging.getLogger().level)
        shown = f"[{host}]" if ":" in host else host
        adapters = f", LoRA adapters: {', '.join(r.lora_name for r in loras)}" if loras else ""
        log.info("serving %s as %s on http://%s:%d/v1 (max_model_len %d%s%s)", args.model, ", ".join(names), shown,
                 port, engine.engine.max_model_len, ", API key required" if api_key else "", adapters)
        if not args.no_ui:
            log.info("chat playground on http://%s:%d/", shown, port)
        if args.runs:
            log.info("run dashboard of %s on http://%s:%d/runs", Path(args.runs).resolve(), shown, port)
        # uvicorn turns SIGTERM/SIGINT into a graceful shutdown, then re-raises the signal under the handlers it
        # found; ignoring them here makes that re-raise a no-op, so a stopped server exits 0.
        previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            asyncio.run(serve(server, sock, args.shutdown_timeout))
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    finally:
        engine.shutdown()
    if engine.fatal is not None:
        log.error("server stopped: %s", engine.fatal)
        return 1
    log.info("server stopped")
    return 0
