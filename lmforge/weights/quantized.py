"""Quantised serving weights: a float model's linears replaced by QuantLinears (lmforge/layers/quant_linear.py).

Three sources, one result (`quantization=` on the engine, vLLM's spelling):
  "int8"  every decoder linear quantised at load, int8 per 32-element block (symmetric absmax, float32 scale: the
          Q8_0 scheme; per output channel was measured further from the float model: docs/architecture.md);
  "int4"  every decoder linear in 4-bit groups of 32 along the input (scale and min per group, the Q4_1 idea);
          with both, lm_head becomes int8 too (it is read every decode step: as float it alone would stream
          as many bytes as the whole int8 decoder);
  "gguf"  the GGUF file's own blocks served as they are: Q8_0, Q4_0, Q4_1 and Q4_K linears (lm_head too, from
          `output` or the tied `token_embd`); tensors of other types stay float (logged), as do norms.
A tied model's embedding is then read from its int8 lm_head (`serve_tied_embedding`: no float copy of the table);
an untied one keeps its float table (one row read per token).
A linear whose in_features is not a multiple of 32 stays float (logged).

A quantised checkpoint (`lmforge convert SRC OUT --quantize int8|int4`) is an HF directory whose config.json carries
  "quantization_config": {"quant_method": "lmforge", "method": "int8"|"int4", "modules": [module paths]}
and whose safetensors hold, for each listed module, `<path>.qweight` (int8 [out, in] or uint8 [out, in/2]),
`<path>.scales` (float16 [out, in/32]), `<path>.mins` (4-bit only, float16 [out, in/32]) and
`<path>.bias` if any (float32); every other tensor is as in a float checkpoint.
"""

import logging
from pathlib import Path

import torch
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.layers.linear import Linear
from lmforge.layers.quant_linear import BLOCK, QuantEmbedding, QuantLinear

log = logging.getLogger("lmforge")
METHODS = ("int8", "int4", "gguf")
CONFIG_KEY = "quantization_config"


def quantizable(model: nn.Module) -> dict[str, Linear]:
    """The float linears quantisation replaces: every plain Linear (decoder projections and lm_head) whose input
    width is a multiple of the 32-element block."""
    return {path: m for path, m in model.named_modules() if type(m) is Linear and m.in_features % BLOCK == 0}


def _replace(model: nn.Module, path: str, layer: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, layer)


def _skipped(model: nn.Module) -> None:
    left = [path for path, m in model.named_modules() if type(m) is Linear]
    if left:
        log.info("quantization: %d linear(s) stay float (input width not a multiple of %d or no quantised source), "
                 "e.g. %s", len(left), BLOCK, left[0])


@torch.no_grad()
def quantize_model(model: nn.Module, method: str) -> None:
    """Replaces the model's linears in place: `method` for the decoder's, int8 for lm_head."""
    if method not in ("int8", "int4"):
        raise LmforgeError(f"unknown quantization {method!r}; choose one of {', '.join(METHODS)}")
    for path, layer in quantizable(model).items():
        head = path.removesuffix(".inner") == "lm_head"  # a tensor-parallel rank's head holds its slice as .inner
        _replace(model, path, QuantLinear.quantize(layer, "int8" if head else method))
    _skipped(model)


@torch.no_grad()
def serve_gguf_blocks(model: nn.Module, gguf_path: Path) -> None:
    """Replaces each linear whose GGUF tensor is of a served type by a QuantLinear made of the file's blocks."""
    from gguf import GGUFReader

    from lmforge.weights.gguf_blocks import SERVED_TYPES, packed_blocks
    from lmforge.weights.gguf_import import FAMILIES, hf_name, open_gguf, unpermute

    reader, meta = open_gguf(Path(gguf_path))
    assert isinstance(reader, GGUFReader)
    permuted = FAMILIES[meta["general.architecture"]][2]
    heads = {"q_proj": model.args.num_attention_heads, "k_proj": model.args.num_key_value_heads}
    targets = quantizable(model)
    tensors = {hf_name(t.name): t for t in reader.tensors}
    if "lm_head.weight" not in tensors and "model.embed_tokens.weight" in tensors:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]  # tied: lm_head reads the embedding table
    floats: dict[str, int] = {}
    for path, layer in targets.items():
        t = tensors.get(f"{path}.weight")
        if t is None or t.tensor_type not in SERVED_TYPES:
            kind = t.tensor_type.name if t is not None else "missing"
            floats[kind] = floats.get(kind, 0) + 1
            continue
        q, scales, mins = packed_blocks(t.data, t.tensor_type)
        proj = path.rpartition(".")[2]
        if permuted and proj in heads:  # llama.cpp's q/k row order, undone row-wise: blocks run along rows
            q, scales = unpermute(q, heads[proj]), unpermute(scales, heads[proj])
            mins = unpermute(mins, heads[proj]) if mins is not None else None
        if q.shape[0] != layer.out_features or q.shape[1] * (2 if q.dtype == torch.uint8 else 1) != layer.in_features:
            raise LmforgeError(f"{gguf_path}: tensor {t.name!r} does not fit {path} "
                               f"[{layer.out_features}, {layer.in_features}]")
        bias = layer.bias.detach() if layer.bias is not None else None
        _replace(model, path, QuantLinear(q, scales, mins, bias, dtype=layer.weight.dtype))
    if floats:
        log.info("GGUF: linears served as float (dequantised) by type: %s",
                 ", ".join(f"{k} x{v}" for k, v in sorted(floats.items())))
    _skipped(model)


def quantized_modules(model: nn.Module) -> list[str]:
    return [path for path, m in model.named_modules() if type(m) is QuantLinear]


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights as served (parameters and buffers, tied tensors once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def build_quantized_model(model_dir: Path, cfg: dict, dtype: str | torch.dtype, device: str) -> nn.Module:
    """A model from a quantised checkpoint (see the module docstring): QuantLinears where config.json lists them."""
    from lmforge.models import allocate, build_on_meta, resolve_dtype
    from lmforge.weights.hf_dir import load_weights

    spec = cfg[CONFIG_KEY]
    if spec.get("quant_method") != "lmforge" or spec.get("method") not in ("int8", "int4"):
        raise LmforgeError(f"{model_dir}/config.json: quantization_config {spec} is not one lmforge can load "
                           "(quant_method 'lmforge', method int8 or int4)")
    torch_dtype = resolve_dtype(dtype, cfg, device)
    model, args = build_on_meta(cfg, str(model_dir / "config.json"), torch_dtype)
    for path in spec["modules"]:
        layer = model.get_submodule(path)
        method = "int8" if path == "lm_head" else spec["method"]
        _replace(model, path, _empty_quant(layer, method, torch_dtype))
    model = allocate(model, device)
    if args.tie_word_embeddings and type(model.lm_head) is Linear:  # allocate() gives shared parameters apart
        model.lm_head.weight = model.model.embed_tokens.weight
    load_weights(model, model_dir)
    for module in model.modules():
        if type(module) is QuantLinear:
            module.group_rows()  # the rows as saved, now in the kernels' layout
    model.config = cfg
    return model.eval()


def _empty_quant(layer: Linear, method: str, dtype: torch.dtype) -> QuantLinear:
    n, k = layer.out_features, layer.in_features
    bias = torch.empty(n, device="meta") if layer.bias is not None else None
    groups = torch.empty(n, k // BLOCK, dtype=torch.float16, device="meta")  # as quantize_q8 / quantize_int4 make
    if method == "int8":
        return QuantLinear(torch.empty(n, k, dtype=torch.int8, device="meta"), groups, bias=bias, dtype=dtype)
    return QuantLinear(torch.empty(n, k // 2, dtype=torch.uint8, device="meta"), groups, groups.clone(), bias,
                       dtype=dtype)


def save_quantized(model: nn.Module, cfg: dict, method: str, out_dir: Path, source_dir: Path | None = None) -> None:
    from lmforge.weights.hf_dir import save_state_dict, write_side_files

    state = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    if cfg.get("tie_word_embeddings") and "lm_head.weight" in state:
        del state["lm_head.weight"]
    cfg = {**cfg, CONFIG_KEY: {"quant_method": "lmforge", "method": method, "modules": quantized_modules(model)}}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_state_dict(state, out_dir)
    write_side_files(cfg, out_dir, next(model.parameters()).dtype, source_dir)


def load_for_serving(spec: str | None, model_dir: Path, quantization: str | None, dtype: str | torch.dtype, device: str
                     ) -> tuple[nn.Module, str | None]:
    """The engine's model: float, or quantised as `quantization` says (None: "gguf" for a .gguf path, as vLLM
    does; a quantised checkpoint is always loaded as it was saved); returns (model, the quantization used)."""
    from lmforge.models import build_model
    from lmforge.models.config import read_config

    cfg = read_config(model_dir)
    if CONFIG_KEY in cfg:
        if quantization not in (None, cfg[CONFIG_KEY].get("method")):
            raise LmforgeError(f"{model_dir} is a {cfg[CONFIG_KEY].get('method')}-quantised checkpoint; it cannot "
                               f"be served with quantization={quantization!r} (leave quantization unset)")
        model = build_quantized_model(model_dir, cfg, dtype, device)
        serve_tied_embedding(model)
        return model, cfg[CONFIG_KEY]["method"]
    gguf = gguf_source(spec)
    if quantization is None and gguf is not None and str(spec).endswith(".gguf"):
        quantization = "gguf"
    if quantization is not None and device != "cpu" and not str(device).startswith("cpu"):
        raise LmforgeError(f"quantization={quantization!r} is served by CPU kernels only; use device='cpu'")
    model = build_model(model_dir, dtype=dtype, device=device)
    if quantization == "gguf":
        if gguf is None:
            raise LmforgeError(f"quantization='gguf' needs a .gguf file as the model, got {spec!r}")
        serve_gguf_blocks(model, gguf)
    elif quantization is not None:
        quantize_model(model, quantization)
    if quantization is not None:
        serve_tied_embedding(model)
    return model, quantization


def serve_tied_embedding(model: nn.Module) -> None:
    """A tied model whose lm_head is int8 reads its token embeddings from the head (QuantEmbedding) and drops the
    float table: 57 MB of SmolLM2-135M's 199 MB of int8 weights."""
    decoder = getattr(model, "model", None)
    if getattr(getattr(model, "args", None), "tie_word_embeddings", False) and decoder is not None \
            and type(decoder.embed_tokens) is nn.Embedding and QuantEmbedding.serves(getattr(model, "lm_head", None)):
        decoder.embed_tokens = QuantEmbedding(model.lm_head, decoder.embed_tokens.weight.dtype)


def gguf_source(spec: str | None) -> Path | None:
    """The GGUF file a model name stands for (a .gguf path, or an alias shipped as GGUF), else None."""
    from lmforge.weights.resolve import ALIASES, DEFAULT_MODEL, embedded_gguf

    spec = spec or DEFAULT_MODEL
    if spec in ALIASES:
        return embedded_gguf(spec)
    path = Path(spec).expanduser()
    return path if path.suffix == ".gguf" and path.is_file() else None
