"""POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's endpoints and replies): change the served adapters
while the server runs. A refusal is a 400 (404 for an unknown name, 409 while requests use the adapter) in OpenAI's
error shape; the server keeps serving what it served before."""

import logging

from starlette.responses import PlainTextResponse

from lmforge.engine.lora_manager import AdapterInUseError, AdapterLimitError, AdapterNotFoundError
from lmforge.errors import LmforgeError
from lmforge.serve.errors import APIError
from lmforge.serve.protocol import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest
from lmforge.serve.state import ServerState

log = logging.getLogger("lmforge")


def _require_lora(state: ServerState) -> None:
    if not state.engine.engine.config.enable_lora:
        raise APIError(400, "This server does not serve LoRA adapters; start it with --enable-lora or "
                       "--lora NAME=PATH.", code="lora_disabled")


async def load_lora_adapter(state: ServerState, req: LoadLoRAAdapterRequest) -> PlainTextResponse:
    _require_lora(state)
    lora = state.models.new_lora_request(req.lora_name, req.lora_path)
    try:
        await state.engine.add_lora(lora)
    except AdapterLimitError as e:
        raise APIError(400, f"{e}.", param="lora_name", code="lora_limit_reached") from None
    except (LmforgeError, ValueError) as e:  # a missing or unfit adapter: nothing was loaded
        raise APIError(400, f"{e}.", param="lora_path", code="invalid_lora_adapter") from None
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
