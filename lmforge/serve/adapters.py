"""POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's endpoints and replies): change the served adapters
while the server runs. A refusal is a 400 (404 for an unknown name, 409 while requests use the adapter) in OpenAI's
error shape; the server keeps serving what it served before.

Loading reads the server's file system for a client, so it is off unless the operator turns it on (vLLM's
VLLM_ALLOW_RUNTIME_LORA_UPDATING; `lmforge serve --allow-runtime-lora-updating`), can be confined to directories
(--allowed-lora-paths), and answers a client nothing about the file system that it did not send: outside those
directories, every adapter that cannot be loaded gets the same sentence, and the reason goes to the server log."""

import logging
import os

from starlette.responses import PlainTextResponse

from lmforge.engine.lora_manager import AdapterInUseError, AdapterLimitError, AdapterNotFoundError
from lmforge.errors import LmforgeError
from lmforge.serve.errors import APIError
from lmforge.serve.protocol import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest
from lmforge.serve.state import ServerState

log = logging.getLogger("lmforge")

ENV_VARS = ("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "LMFORGE_ALLOW_RUNTIME_LORA_UPDATING")
MAX_PATH_BYTES = 4096  # Linux's PATH_MAX: longer paths cannot be opened at all


def runtime_updating_from_env() -> bool:
    """Whether either environment variable turns run-time loading on ("1" or "true", as vLLM reads its own)."""
    return any(os.environ.get(name, "0").strip().lower() in ("1", "true") for name in ENV_VARS)


def _require_lora(state: ServerState) -> None:
    if not state.allow_runtime_lora_updating:
        raise APIError(404, "Run-time LoRA adapter loading is off on this server; its operator can turn it on with "
                       "--allow-runtime-lora-updating (or VLLM_ALLOW_RUNTIME_LORA_UPDATING=1).", code="not_found")
    if not state.engine.engine.config.enable_lora:
        raise APIError(400, "This server does not serve LoRA adapters; start it with --enable-lora or "
                       "--lora NAME=PATH.", code="lora_disabled")


def _adapter_dir(state: ServerState, path: str) -> tuple[str, bool]:
    """(the directory to load, whether it lies under --allowed-lora-paths); a 400 for a path no file system takes
    or one outside the allowed directories (symbolic links resolved)."""
    if "\0" in path or len(os.fsencode(path)) > MAX_PATH_BYTES:
        raise APIError(400, f"lora_path must be a file system path of at most {MAX_PATH_BYTES} bytes without NUL "
                       "characters.", param="lora_path", code="invalid_lora_adapter")
    real = os.path.realpath(path)
    roots = state.allowed_lora_paths
    if roots is None:
        return real, False
    if not any(real == root or real.startswith(root.rstrip(os.sep) + os.sep) for root in roots):
        raise APIError(400, "lora_path is outside the directories this server loads adapters from "
                       "(--allowed-lora-paths).", param="lora_path", code="invalid_lora_adapter")
    return real, True


async def load_lora_adapter(state: ServerState, req: LoadLoRAAdapterRequest) -> PlainTextResponse:
    _require_lora(state)
    path, allowed = _adapter_dir(state, req.lora_path)
    lora = state.models.new_lora_request(req.lora_name, path)
    try:
        await state.engine.add_lora(lora)
    except AdapterLimitError as e:
        raise APIError(400, f"{e}.", param="lora_name", code="lora_limit_reached") from None
    except (LmforgeError, ValueError, OSError) as e:  # a missing or unfit adapter: nothing was loaded
        log.warning("LoRA adapter %r not loaded from %r: %s", req.lora_name, req.lora_path, e)
        reason = f"{e}." if allowed else "the server log says why."
        raise APIError(400, f"lora_path does not name a PEFT LoRA adapter this server can load: {reason}",
                       param="lora_path", code="invalid_lora_adapter") from None
    state.models.add_adapter(lora)
    return PlainTextResponse(f"Success: LoRA adapter '{lora.lora_name}' added successfully.")


async def unload_lora_adapter(state: ServerState, req: UnloadLoRAAdapterRequest) -> PlainTextResponse:
    _require_lora(state)
    route = state.models.remove_adapter(req.lora_name)  # first, so no new request is routed to it meanwhile
    try:
        await state.engine.remove_lora(req.lora_name)
    except AdapterInUseError as e:  # refused, not deferred: the client decides when to try again
        state.models.add_adapter(route.adapter)
        raise APIError(409, f"{e}.", param="lora_name", code="lora_in_use") from None
    except AdapterNotFoundError:  # the engine no longer had it: the route was all that was left
        log.warning("LoRA adapter %s had a route but was not loaded in the engine", req.lora_name)
    return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")
