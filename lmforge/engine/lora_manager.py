"""Adapters of a multi-LoRA engine: `LoRARequest` (vLLM's offline API), and the manager that checks a PEFT adapter
directory against the served model and writes it into a free slot of every MultiLoRALinear it adapts.

Each load gets a fresh `uid`, never reused: it is the sequence's `adapter_id`, hashed into prefix-cache keys, so no
two adapters (nor an adapter reloaded from changed files under the same name) ever share cached blocks.
"""

import itertools
import logging
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from lmforge.engine.sequence import Sequence
from lmforge.errors import LmforgeError
from lmforge.layers.lora import OUTPUT_LAYER, linear_layers, lora_scaling
from lmforge.layers.multi_lora import NO_ADAPTER, LoraBatch, MultiLoRALinear, peft_path
from lmforge.weights.peft import CONFIG_FILE, read_adapter, read_adapter_config

log = logging.getLogger("lmforge")


@dataclass(frozen=True, slots=True)
class LoRARequest:
    """Which adapter a request uses, as vLLM names it: a name, a positive integer id, and the adapter directory."""

    lora_name: str
    lora_int_id: int
    lora_path: str = ""

    def __post_init__(self):
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise ValueError("lora_name must be a non-empty string")
        if not isinstance(self.lora_int_id, int) or isinstance(self.lora_int_id, bool) or self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be an integer >= 1, got {self.lora_int_id!r}")
        if not isinstance(self.lora_path, str) or not self.lora_path:
            raise ValueError(f"lora_path of adapter {self.lora_name!r} must name a PEFT adapter directory")


@dataclass(frozen=True, slots=True)
class LoadedAdapter:
    request: LoRARequest
    slot: int
    uid: int  # the sequences' adapter_id: a prefix-cache key never reused
    rank: int
    modules: int  # layers it adapts
    base_model: str | None  # what adapter_config.json says it was trained on

    @property
    def name(self) -> str:
        return self.request.lora_name


class AdapterNotFoundError(LmforgeError):
    """No adapter of that name is loaded."""


class AdapterLimitError(LmforgeError):
    """max_loras adapters are already loaded."""


class AdapterInUseError(LmforgeError):
    """The adapter still has requests in flight; it can be unloaded once they finish."""


class LoRAManager:
    """The loaded adapters of one engine and the slots they occupy. Call from the engine's own thread."""

    def __init__(self, model: nn.Module, layers: dict[str, MultiLoRALinear], max_loras: int, max_rank: int,
                 cuts: dict | None = None):
        """cuts (a tensor-parallel rank's, engine/tp_workers.py `lora_cuts`): per layer path, the full layer's
        (out, in) features, which adapters are checked against, and the parts of A and B this rank keeps."""
        self.layers, self.cuts = layers, cuts
        self.max_loras, self.max_rank = max_loras, max_rank
        if not layers:
            raise LmforgeError("the model has no projection multi-LoRA serving can adapt")
        first = next(iter(layers.values())).lora_a
        self._device = first.device
        # Linear layers adapters may not touch (lm_head, MoE routers and experts): checked like the others, so an
        # adapter of one is refused for what it is rather than as a mismatch, and never adapted.
        self.unservable = {peft_path(path): m for path, m in linear_layers(model).items()
                           if not path.endswith(".base_layer")}
        self.adapters: dict[str, LoadedAdapter] = {}
        self._by_uid: dict[int, LoadedAdapter] = {}
        self._uids = itertools.count(1)

    def get(self, name: str) -> LoadedAdapter | None:
        return self.adapters.get(name)

    def loaded(self) -> list[LoadedAdapter]:
        return list(self.adapters.values())

    def batch(self, seqs: list[Sequence], num_new_tokens: list[int]) -> LoraBatch | None:
        """The step's LoraBatch (which tokens use which slot); None when no sequence of the step uses an adapter."""
        if not any(seq.adapter_id for seq in seqs):
            return None
        slots = [self._by_uid[seq.adapter_id].slot if seq.adapter_id else NO_ADAPTER for seq in seqs]
        return LoraBatch.build(slots, num_new_tokens, self._device)

    def add(self, request: LoRARequest, slot: int | None = None) -> LoadedAdapter:
        """Checks the adapter against the served model and loads it into a free slot (`slot`: that one); raises
        LmforgeError with one sentence (nothing is loaded) when it does not fit."""
        name, where = request.lora_name, request.lora_path
        if name in self.adapters:
            raise LmforgeError(f"a LoRA adapter named {name!r} is already loaded (from "
                               f"{self.adapters[name].request.lora_path}); unload it first or pick another name")
        if any(a.request.lora_int_id == request.lora_int_id for a in self.adapters.values()):
            raise LmforgeError(f"lora_int_id {request.lora_int_id} is already used by another loaded adapter")
        used = {a.slot for a in self.adapters.values()}
        if len(used) >= self.max_loras:
            raise AdapterLimitError(f"cannot load adapter {name!r}: max_loras={self.max_loras} adapters are already "
                                    f"loaded ({', '.join(self.adapters)}); unload one or raise --max-loras")
        cfg = read_adapter_config(where)
        file = Path(where) / CONFIG_FILE
        if cfg.dora:
            raise LmforgeError(f"{file}: use_dora = true (DoRA) is not supported for multi-LoRA serving; merge the "
                               "adapter into the base (lmforge merge) and serve the merged model")
        if cfg.modules_to_save:
            raise LmforgeError(f"{file}: modules_to_save = {list(cfg.modules_to_save)} trains whole modules, which "
                               "multi-LoRA serving cannot swap per request; merge the adapter (lmforge merge) instead")
        if cfg.rank > self.max_rank:
            raise LmforgeError(f"{file}: r = {cfg.rank} exceeds the engine's max_lora_rank={self.max_rank}; raise "
                               "--max-lora-rank")
        shapes = self.layers if self.cuts is None else {p: cut.full for p, cut in self.cuts.items()}
        files = read_adapter(where, {**self.unservable, **shapes})
        if not files.modules:
            raise LmforgeError(f"{files.file} holds no LoRA tensors; nothing would change the base model's outputs")
        if outside := sorted(set(files.modules) - set(self.layers)):
            what = "the output layer" if outside[0].rpartition(".")[2] == OUTPUT_LAYER else "a layer multi-LoRA " \
                "serving does not adapt (MoE routers and experts are not)"
            names = ", ".join(sorted({p.rpartition(".")[2] for p in self.layers}))
            raise LmforgeError(f"{files.file} adapts {outside[0]}, {what}; served adapters may adapt {names}")
        if files.full:
            key = next(iter(files.full.values()))[0]
            raise LmforgeError(f"{files.file}: {key!r} is a whole-module tensor (modules_to_save), which multi-LoRA "
                               "serving cannot swap per request")
        slot = min(set(range(self.max_loras)) - used) if slot is None else slot
        scaling = lora_scaling(cfg.alpha, cfg.rank, cfg.rslora)
        try:
            for path, parts in files.modules.items():
                a, b = parts["A"][1], parts["B"][1]
                if self.cuts is not None:
                    a, b = self.cuts[path].a(a), self.cuts[path].b(b)
                self.layers[path].set_slot(slot, a, b, scaling)
        except ValueError as e:  # values that overflow the served dtype
            self._clear(slot)
            raise LmforgeError(f"{files.file}: {path}: {e}") from None
        except BaseException:
            self._clear(slot)
            raise
        adapter = LoadedAdapter(request, slot, next(self._uids), cfg.rank, len(files.modules), cfg.base_model)
        self.adapters[name] = adapter
        self._by_uid[adapter.uid] = adapter
        log.info("LoRA adapter %s loaded from %s into slot %d: rank %d, %d layers", name, where, slot, cfg.rank,
                 adapter.modules)
        return adapter

    def remove(self, name: str) -> LoadedAdapter:
        """Frees the adapter's slot. The engine checks first that no request still uses it."""
        adapter = self.adapters.pop(name, None)
        if adapter is None:
            raise AdapterNotFoundError(f"no LoRA adapter named {name!r} is loaded"
                                       + (f" (loaded: {', '.join(self.adapters)})" if self.adapters else ""))
        del self._by_uid[adapter.uid]
        self._clear(adapter.slot)
        log.info("LoRA adapter %s unloaded (slot %d free)", name, adapter.slot)
        return adapter

    def _clear(self, slot: int) -> None:
        for layer in self.layers.values():
            if layer.ranks[slot]:
                layer.clear_slot(slot)
