"""Which model a request's `model` field names. Every route is the base weights today; LoRA adapters (issue 5)
become more routes here, each carrying the adapter the engine should apply."""

import time
from dataclasses import dataclass

from lmforge.serve.errors import APIError
from lmforge.serve.protocol import ModelCard


@dataclass(frozen=True, slots=True)
class ModelRoute:
    name: str  # as clients name it, echoed in every response's `model`
    adapter: str | None = None  # the LoRA adapter to apply; None: the base model


class ServedModels:
    def __init__(self, names: list[str], root: str, max_model_len: int):
        if not names or not all(names):
            raise ValueError("served model names must be non-empty strings")
        self.routes = {name: ModelRoute(name) for name in names}
        self.default = self.routes[names[0]]
        self.root = root
        self.max_model_len = max_model_len
        self.created = int(time.time())

    def resolve(self, name: str | None) -> ModelRoute:
        """The route for a request's `model`; None picks the default (as vLLM does); unknown names are a 404."""
        if name is None:
            return self.default
        route = self.routes.get(name)
        if route is None:
            raise APIError(404, f"The model `{name}` does not exist. Served models: "
                           f"{', '.join(self.routes)}.", param="model", code="model_not_found")
        return route

    def cards(self) -> list[ModelCard]:
        return [ModelCard(id=name, created=self.created, root=self.root, parent=None,
                          max_model_len=self.max_model_len) for name in self.routes]
