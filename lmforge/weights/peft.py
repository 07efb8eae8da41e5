"""PEFT LoRA adapter directories (adapter_config.json + adapter_model.safetensors): written as PEFT writes them,
read whether PEFT or lmforge wrote them. Saved keys are PEFT's: `base_model.model.<module path>.lora_A.weight`,
`.lora_B.weight`, `.lora_magnitude_vector` (DoRA), and `base_model.model.<path>.<param>` for modules_to_save."""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lmforge.config.schema import LoraConfig
from lmforge.errors import LmforgeError
from lmforge.layers.lora import LoraSummary, apply_lora, linear_layers, lora_layers, matches, merge_lora, module_paths
from lmforge.weights.atomic import atomic_dir

PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
LEGACY_WEIGHTS_FILE = "adapter_model.bin"  # what PEFT wrote before safetensors became its default
# PEFT features lmforge does not implement: a set value would silently change what the adapter computes.
# target_parameters first: PEFT >= 0.22 adds a rank_pattern to it for fused MoE experts, and it is the cause.
UNSUPPORTED = {"target_parameters": "LoRA on bare parameters (e.g. routed MoE experts' fused weights)",
               "fan_in_fan_out": "transposed (Conv1D) weights", "lora_bias": "LoRA biases",
               "rank_pattern": "per-module ranks", "alpha_pattern": "per-module alphas",
               "layer_replication": "layer replication",
               "trainable_token_indices": "trainable tokens", "use_qalora": "QA-LoRA", "use_bdlora": "BD-LoRA",
               "alora_invocation_tokens": "activated LoRA"}
SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_magnitude_vector": "m",
            ".lora_magnitude_vector.weight": "m"}


@dataclass(frozen=True, slots=True)
class AdapterConfig:
    """What adapter_config.json says, validated; target_modules is a tuple of names or PEFT's regex string."""

    rank: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...] | str
    rslora: bool
    dora: bool
    modules_to_save: tuple[str, ...]
    base_model: str | None

    def lora_config(self, target_modules: list[str]) -> LoraConfig:
        return LoraConfig(rank=self.rank, alpha=self.alpha, dropout=self.dropout, target_modules=target_modules,
                          rslora=self.rslora, dora=self.dora, modules_to_save=list(self.modules_to_save))


def read_adapter_config(adapter_dir: str | Path) -> AdapterConfig:
    """Reads and checks adapter_config.json alone (no weights): enough to accept or refuse an adapter."""
    adapter_dir = Path(adapter_dir)
    file = adapter_dir / CONFIG_FILE
    try:  # OSError: a path too long for the file system, a directory it may not read
        if not adapter_dir.is_dir():
            raise LmforgeError(f"adapter directory {adapter_dir} not found")
        if not file.is_file():
            raise LmforgeError(f"{adapter_dir} has no {CONFIG_FILE}; pass a PEFT adapter directory")
        raw = json.loads(file.read_text())
    except OSError as e:
        raise LmforgeError(f"cannot read the adapter directory {adapter_dir} ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LmforgeError(f"{file} is not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise LmforgeError(f"{file} must hold a JSON object")
    if raw.get("peft_type") != "LORA":
        raise LmforgeError(f"{file}: peft_type {raw.get('peft_type')!r} is not supported; lmforge loads LoRA "
                           "adapters (peft_type LORA)")
    for key, feature in UNSUPPORTED.items():
        if raw.get(key):
            raise LmforgeError(f"{file}: {key} = {raw[key]!r} asks for {feature}, which lmforge does not support")
    if raw.get("bias", "none") != "none":
        raise LmforgeError(f"{file}: bias = {raw['bias']!r} (trained biases) is not supported; only 'none'")

    def field(key, kinds, default, ok=lambda v: True, rule=""):
        value = raw.get(key, default)
        if not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds or not ok(value):
            raise LmforgeError(f"{file}: {key} = {value!r} is invalid{rule}")
        return value

    targets = field("target_modules", (list, str), None, lambda v: isinstance(v, str) or
                    all(isinstance(n, str) for n in v) and v, ": expected a non-empty list of module names")
    return AdapterConfig(
        rank=field("r", (int,), 8, lambda v: v >= 1, ": expected a positive integer"),
        alpha=float(field("lora_alpha", (int, float), 8, lambda v: v > 0, ": expected a positive number")),
        dropout=float(field("lora_dropout", (int, float), 0.0, lambda v: 0 <= v < 1, ": expected 0 <= p < 1")),
        target_modules=targets if isinstance(targets, str) else tuple(targets),
        rslora=field("use_rslora", (bool,), False),
        dora=field("use_dora", (bool,), False),
        modules_to_save=tuple(field("modules_to_save", (list, type(None)), None, lambda v: v is None or
                                    all(isinstance(n, str) for n in v), ": expected a list of module names") or ()),
        base_model=raw.get("base_model_name_or_path"))


def read_adapter_tensors(adapter_dir: str | Path) -> tuple[Path, dict[str, torch.Tensor]]:
    adapter_dir = Path(adapter_dir)
    file, legacy = adapter_dir / WEIGHTS_FILE, adapter_dir / LEGACY_WEIGHTS_FILE
    if file.is_file():
        try:
            return file, load_file(file)
        except (SafetensorError, OSError) as e:
            raise LmforgeError(f"{file} is not a readable safetensors file ({e}); save the adapter again") from None
    if legacy.is_file():
        try:
            return legacy, torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises RuntimeError/UnpicklingError/EOFError for damaged files
            raise LmforgeError(f"{legacy} is not a readable PyTorch checkpoint ({e}); save the adapter again") \
                from None
    raise LmforgeError(f"{adapter_dir} has no {WEIGHTS_FILE}; the adapter directory is incomplete")


@dataclass(frozen=True, slots=True)
class AdapterFiles:
    """An adapter directory read and checked against a model's linear layers."""

    config: AdapterConfig
    file: Path  # the weights file
    modules: dict[str, dict[str, tuple[str, torch.Tensor]]]  # module path -> {"A"/"B"/"m": (key, tensor)}
    full: dict[str, tuple[str, torch.Tensor]]  # modules_to_save: parameter name -> (key, tensor)


def read_adapter(adapter_dir: str | Path, linears: dict[str, nn.Module]) -> AdapterFiles:
    """adapter_config.json and the weights, every LoRA tensor checked against `linears` (module path -> a layer with
    in_features and out_features): the module exists, target_modules names it, rank and sizes fit."""
    cfg = read_adapter_config(adapter_dir)
    file, tensors = read_adapter_tensors(adapter_dir)
    modules, full = _split_keys(file, tensors)
    if isinstance(cfg.target_modules, tuple):  # PEFT's regex form names no modules to check here
        _check_names(linears, cfg, Path(adapter_dir) / CONFIG_FILE)
    for path, parts in modules.items():
        _check_module(file, path, parts, linears, cfg)
    return AdapterFiles(cfg, file, modules, full)


def load_adapter(model: nn.Module, adapter_dir: str | Path, trainable: bool = False) -> LoraSummary:
    """Wraps the modules a PEFT adapter names in LoRALinear and loads its weights (and modules_to_save) after
    checking every tensor against the model; trainable=False freezes everything (serving, merging)."""
    if lora_layers(model):
        raise LmforgeError(f"cannot load {adapter_dir}: the model already has LoRA layers")
    adapter = read_adapter(adapter_dir, linear_layers(model))
    cfg, file, modules, full = adapter.config, adapter.file, adapter.modules, adapter.full
    saved = module_paths(model, list(cfg.modules_to_save), f"{Path(adapter_dir) / CONFIG_FILE}: modules_to_save")
    params = dict(model.named_parameters(remove_duplicate=False))  # a tied lm_head under its own name too
    for name, (key, tensor) in full.items():
        if not any(name.startswith(path + ".") for path in saved) or name not in params:
            raise LmforgeError(f"{file}: key {key!r} is neither a LoRA tensor nor a parameter of a module in "
                               "modules_to_save")
        if tuple(tensor.shape) != tuple(params[name].shape):
            raise LmforgeError(f"{file}: {key!r} has shape {tuple(tensor.shape)}, the model's {name} "
                               f"{tuple(params[name].shape)}{_trained_on(cfg)}")
    names = sorted({path.rpartition(".")[2] for path in modules})
    summary = apply_lora(model, list(modules), saved, cfg.lora_config(names), trainable=trainable)
    _assign(model, file, modules, full)
    return summary


def merge_adapter(model: nn.Module, config: dict) -> tuple[int, dict]:
    """Folds every LoRA layer into its base weight (merge_lora); returns how many were merged and the HF config the
    merged model is saved with: a trained lm_head (modules_to_save) is no longer tied to the embeddings."""
    merged = merge_lora(model)
    if config.get("tie_word_embeddings") and model.lm_head.weight is not model.model.embed_tokens.weight:
        config = {**config, "tie_word_embeddings": False}
    return merged, config


def load_adapter_weights(model: nn.Module, adapter_dir: str | Path) -> None:
    """Copies a saved adapter's tensors into a model that already has the same LoRA layers (resuming a run):
    the file and the model must hold the same LoRA layers, with the same shapes."""
    file, tensors = read_adapter_tensors(adapter_dir)
    modules, full = _split_keys(file, tensors)
    layers = lora_layers(model)
    if set(modules) != set(layers):
        extra = sorted(set(modules) - set(layers)) or sorted(set(layers) - set(modules))
        where = "the file" if set(modules) - set(layers) else "the model"
        raise LmforgeError(f"{file} adapts {len(modules)} layers, the model has {len(layers)} LoRA layers ({where} "
                           f"alone has {extra[0]}); was it saved with this model and lora configuration?")
    _assign(model, file, modules, full)


def _assign(model: nn.Module, file: Path, modules: dict, full: dict) -> None:
    """Copies every tensor of the file into its parameter (casting to the parameter's dtype), shapes checked."""
    params = dict(model.named_parameters())  # after apply_lora: modules_to_save may have been untied
    targets = [(parts, f"{path}.lora_A.weight", "A") for path, parts in modules.items()]
    targets += [(parts, f"{path}.lora_B.weight", "B") for path, parts in modules.items()]
    targets += [(parts, f"{path}.lora_magnitude_vector", "m") for path, parts in modules.items()]
    pairs = [(name, parts[part]) for parts, name, part in targets if part in parts]
    for name, (key, tensor) in [*pairs, *full.items()]:
        if name not in params:
            raise LmforgeError(f"{file}: {key!r} has no place in the model ({name} does not exist); was it saved "
                               "with this model and lora configuration?")
        if tuple(tensor.shape) != tuple(params[name].shape):
            raise LmforgeError(f"{file}: {key!r} has shape {tuple(tensor.shape)}, the model's {name} "
                               f"{tuple(params[name].shape)}")
    with torch.no_grad():
        for name, (_, tensor) in [*pairs, *full.items()]:
            params[name].copy_(tensor)


def _split_keys(file: Path, tensors: dict[str, torch.Tensor]):
    """{module path: {"A"/"B"/"m": (key, tensor)}} and {parameter name: (key, tensor)} of full modules."""
    modules, full = {}, {}
    for key, tensor in tensors.items():
        if not key.startswith(PREFIX):
            raise LmforgeError(f"{file}: key {key!r} lacks PEFT's {PREFIX!r} prefix; is this a LoRA adapter of a "
                               "causal language model?")
        name = key[len(PREFIX):]
        suffix = next((s for s in SUFFIXES if name.endswith(s)), None)
        if suffix is not None:
            modules.setdefault(name[:-len(suffix)], {})[SUFFIXES[suffix]] = (key, tensor)
        elif ".lora_" in name:
            raise LmforgeError(f"{file}: {key!r} is a kind of LoRA tensor lmforge does not support (LoRA on "
                               "embeddings or convolutions)")
        else:
            full[name] = (key, tensor)
    return modules, full


def _check_names(linears: dict, cfg: AdapterConfig, file: Path) -> None:
    for name in cfg.target_modules:
        if not any(matches(path, [name]) for path in linears):
            have = ", ".join(sorted({path.rpartition(".")[2] for path in linears}))
            raise LmforgeError(f"{file}: target module {name!r} matches no linear layer of the model (its linear "
                               f"layers are named {have}){_trained_on(cfg)}")


def _check_module(file: Path, path: str, parts: dict, linears: dict, cfg: AdapterConfig) -> None:
    key = PREFIX + path
    if path not in linears:
        raise LmforgeError(f"{file}: {key}.* adapts {path}, which is not a linear layer of the model"
                           f"{_trained_on(cfg)}")
    if isinstance(cfg.target_modules, tuple) and not matches(path, list(cfg.target_modules)):
        raise LmforgeError(f"{file}: {key}.* adapts {path}, which target_modules in {CONFIG_FILE} does not name")
    for part, what in (("A", "lora_A.weight"), ("B", "lora_B.weight")):
        if part not in parts:
            raise LmforgeError(f"{file} lacks {key}.{what}; the adapter file is incomplete")
    if cfg.dora != ("m" in parts):
        state = "lacks" if cfg.dora else "has"
        raise LmforgeError(f"{file} {state} {key}.lora_magnitude_vector, but {CONFIG_FILE} says use_dora = "
                           f"{str(cfg.dora).lower()}")
    linear = linears[path]
    expected = {"A": (cfg.rank, linear.in_features), "B": (linear.out_features, cfg.rank),
                "m": (linear.out_features,)}
    for part, (tensor_key, tensor) in parts.items():
        shape = tuple(tensor.shape)
        if shape == expected[part]:
            continue
        rank = {"A": shape[0], "B": shape[-1]}.get(part) if len(shape) == 2 else None
        if rank is not None and rank != cfg.rank:
            raise LmforgeError(f"{file}: {tensor_key!r} has shape {shape}, rank {rank}, but {CONFIG_FILE} says "
                               f"r = {cfg.rank}")
        raise LmforgeError(f"{file}: {tensor_key!r} has shape {shape}, the model's {path} needs "
                           f"{expected[part]} ({linear.in_features} in, {linear.out_features} out)"
                           f"{_trained_on(cfg)}")
    for tensor_key, tensor in parts.values():  # a NaN or Inf would turn every output it touches into NaN
        if tensor.is_floating_point() and not tensor.isfinite().all():
            raise LmforgeError(f"{file}: {tensor_key!r} holds NaN or infinite values; the adapter is damaged "
                               "(diverged training?) and cannot be used")


def _trained_on(cfg: AdapterConfig) -> str:
    return f"; the adapter was trained on {cfg.base_model}" if cfg.base_model else "; was it trained on this model?"


def save_adapter(model: nn.Module, out_dir: str | Path, cfg: LoraConfig, base_model: str | Path) -> Path:
    """Writes the model's LoRA tensors and modules_to_save as a PEFT adapter directory that PEFT, vLLM and
    `load_adapter` read. A new directory appears whole (written beside it, then renamed); into an existing one
    each file is replaced atomically, other files left alone."""
    layers = lora_layers(model)
    if not layers:
        raise LmforgeError("the model has no LoRA layers to save; add_lora or load_adapter first")
    state = {}
    for path, layer in layers.items():
        if layer.merged:
            raise LmforgeError(f"{path} is merged into its base weight; save the adapter before merging")
        state[f"{path}.lora_A.weight"] = layer.lora_A.weight
        state[f"{path}.lora_B.weight"] = layer.lora_B.weight
        if layer.dora:
            state[f"{path}.lora_magnitude_vector"] = layer.lora_magnitude_vector
    for path in module_paths(model, cfg.modules_to_save):
        for name, p in model.get_submodule(path).named_parameters():
            state[f"{path}.{name}"] = p
    return write_adapter(state, out_dir, cfg, base_model)


def write_adapter(tensors: dict[str, torch.Tensor], out_dir: str | Path, cfg: LoraConfig,
                  base_model: str | Path) -> Path:
    """The adapter directory of `tensors`, named as in the model (`model.layers.0.self_attn.q_proj.lora_A.weight`,
    modules_to_save's weights): what save_adapter collects, or the trained weights a distributed run gathers."""
    state = {f"{PREFIX}{k}": v.detach().cpu().contiguous() for k, v in tensors.items()}
    adapted = sorted({k.removesuffix(".lora_A.weight") for k in tensors if k.endswith(".lora_A.weight")})
    if not adapted:
        raise LmforgeError("no LoRA weights to save: the adapter would be empty")
    targets = cfg.target_modules if cfg.target_modules != "all-linear" else \
        sorted({path.rpartition(".")[2] for path in adapted})
    alpha = int(cfg.alpha) if float(cfg.alpha).is_integer() else cfg.alpha
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base_model),
              "revision": None, "inference_mode": True, "r": cfg.rank, "lora_alpha": alpha,
              "lora_dropout": cfg.dropout, "target_modules": list(targets), "use_rslora": cfg.rslora,
              "use_dora": cfg.dora, "modules_to_save": list(cfg.modules_to_save) or None, "bias": "none",
              "fan_in_fan_out": False, "init_lora_weights": True, "layers_to_transform": None,
              "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}}
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, existing="update") as tmp:
        save_file(state, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return out_dir
