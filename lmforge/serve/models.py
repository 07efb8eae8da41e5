"""Which model a request's `model` field names: one of the base model's served names, or a loaded LoRA adapter,
whose route carries the LoRARequest the engine applies."""

import time
from dataclasses import dataclass

from lmforge.engine.lora_manager import LoRARequest
from lmforge.serve.errors import APIError
from lmforge.serve.responses import ModelCard


@dataclass(frozen=True, slots=True)
class ModelRoute:
    name: str  # as clients name it, echoed in every response's `model`
    adapter: LoRARequest | None = None  # the LoRA adapter to apply; None: the base model


class ServedModels:
    def __init__(self, names: list[str], root: str, max_model_len: int):
        if not names or not all(names):
            raise ValueError("served model names must be non-empty strings")
        self.routes = {name: ModelRoute(name) for name in names}
        self.default = self.routes[names[0]]
        self.root = root
        self.max_model_len = max_model_len
        self.created = int(time.time())
        self._next_lora_id = 1  # vLLM's lora_int_id of the next adapter loaded through the API

    def resolve(self, name: str | None) -> ModelRoute:
        """The route for a request's `model`; None picks the default (as vLLM does); unknown names are a 404."""
        if name is None:
            return self.default
        route = self.routes.get(name)
        if route is None:
            raise APIError(404, f"The model `{name}` does not exist. Served models: "
                           f"{', '.join(self.routes)}.", param="model", code="model_not_found")
        return route

    def new_lora_request(self, name: str, path: str) -> LoRARequest:
        """A LoRARequest for an adapter about to be loaded under `name`, which must not name a served model."""
        if name in self.routes:
            what = "a LoRA adapter that is already loaded" if self.routes[name].adapter else "the base model"
            raise APIError(400, f"The name `{name}` is {what}; unload it first or pick another lora_name.",
                           param="lora_name")
        request = LoRARequest(name, self._next_lora_id, path)
        self._next_lora_id += 1
        return request

    def add_adapter(self, request: LoRARequest) -> None:
        self.routes[request.lora_name] = ModelRoute(request.lora_name, request)
        self._next_lora_id = max(self._next_lora_id, request.lora_int_id + 1)

    def remove_adapter(self, name: str) -> ModelRoute:
        """Takes an adapter's route away (so no new request is routed to it); 404 if `name` is no adapter."""
        route = self.routes.get(name)
        if route is None or route.adapter is None:
            adapters = [r.name for r in self.routes.values() if r.adapter is not None]
            what = "the base model, not an adapter" if route is not None else "not a loaded LoRA adapter"
            raise APIError(404 if route is None else 400, f"`{name}` is {what}. Loaded adapters: "
                           f"{', '.join(adapters) or 'none'}.", param="lora_name",
                           code="model_not_found" if route is None else None)
        return self.routes.pop(name)

    def cards(self) -> list[ModelCard]:
        """Base names, then adapters with `parent` = the base model's first name and `root` = their path (vLLM)."""
        return [ModelCard(id=route.name, created=self.created, root=route.adapter.lora_path if route.adapter else
                          self.root, parent=self.default.name if route.adapter else None,
                          max_model_len=self.max_model_len) for route in self.routes.values()]
