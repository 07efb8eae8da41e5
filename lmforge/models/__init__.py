"""Model families keyed by the HF `architectures` name; build_model turns a model directory into a module."""

from pathlib import Path

import torch
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.models import llama, mixtral, phi3, qwen3, qwen_moe
from lmforge.models.config import MissingConfigKey, read_config
from lmforge.weights.hf_dir import DTYPES, load_weights

ARCHITECTURES: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": llama.Model,
    "MistralForCausalLM": llama.Model,
    "Qwen2ForCausalLM": llama.Model,
    "Qwen3ForCausalLM": qwen3.Model,
    "Phi3ForCausalLM": phi3.Model,
    "MixtralForCausalLM": mixtral.Model,
    "Qwen2MoeForCausalLM": qwen_moe.Model,
    "Qwen3MoeForCausalLM": qwen_moe.Model,
}


def model_class(cfg: dict, where: str = "config.json") -> type[nn.Module]:
    archs = cfg.get("architectures") or []
    for arch in archs:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    named = ", ".join(archs) if archs else "no 'architectures' entry"
    raise LmforgeError(f"{where}: unsupported architecture ({named}); supported: {', '.join(ARCHITECTURES)}")


def resolve_dtype(dtype: str | torch.dtype, cfg: dict, device: torch.device | str = "cpu") -> torch.dtype:
    """'auto' takes the checkpoint's dtype; float16 becomes bfloat16 on CPU, where fp16 matmuls are slow."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        name = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
        if name == "float16" and torch.device(device).type == "cpu":
            name = "bfloat16"
        return DTYPES.get(name, torch.float32)
    if dtype not in DTYPES:
        raise LmforgeError(f"unknown dtype {dtype!r}; choose auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def build_args(cfg: dict, where: str = "config.json"):
    cls = model_class(cfg, where)
    try:
        return cls, cls.Args.from_hf(cfg)
    except MissingConfigKey as e:
        raise LmforgeError(f"{where} lacks the required key {e.args[0]!r}") from None


def build_on_meta(cfg: dict, where: str, torch_dtype: torch.dtype):
    """(the module for `cfg` on the meta device with parameters in torch_dtype, its Args): nothing allocated yet."""
    cls, args = build_args(cfg, where)
    default = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch_dtype)
        with torch.device("meta"):
            return cls(args), args
    finally:
        torch.set_default_dtype(default)


def allocate(model: nn.Module, device: str | torch.device) -> nn.Module:
    """model.to_empty(device=device) without torch's reference implementation of empty_like, whose first call imports
    sympy (0.4 s of a process's start). Like to_empty, it allocates tied parameters separately."""
    return model._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device=device))


def build_model(model_dir: str | Path, dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu",
                progress: bool = True) -> nn.Module:
    """Builds the module on the meta device, allocates it once in the target dtype, streams weights in."""
    model_dir = Path(model_dir)
    cfg = read_config(model_dir)
    model, args = build_on_meta(cfg, str(model_dir / "config.json"), resolve_dtype(dtype, cfg, device))
    model = allocate(model, device)
    if args.tie_word_embeddings:  # allocate() gives shared parameters separate storage
        model.lm_head.weight = model.model.embed_tokens.weight
    load_weights(model, model_dir, progress)
    model.config = cfg
    return model.eval()
