"""llama.cpp GGUF -> Hugging Face model directory: dequantized safetensors, config.json, tokenizer files.

Covers the llama family (general.architecture llama, mistral, qwen2). Weights are dequantized with the
`gguf` package and renamed to HF names; llama.cpp's q/k row interleaving is undone; a missing
`output.weight` means tied embeddings. The tokenizer is built in gguf_tokenizer.py.
"""

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, ReaderTensor
from gguf.quants import dequantize
from tqdm import tqdm

from lmforge.errors import LmforgeError
from lmforge.models import build_args
from lmforge.weights.gguf_tokenizer import build_tokenizer
from lmforge.weights.hf_dir import DTYPES, save_state_dict

Q = GGMLQuantizationType
SUPPORTED_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K)

# general.architecture -> (HF class, model_type, whether convert_hf_to_gguf permuted q/k rows)
FAMILIES = {
    "llama": ("LlamaForCausalLM", "llama", True),
    "mistral": ("MistralForCausalLM", "mistral", True),
    "qwen2": ("Qwen2ForCausalLM", "qwen2", False),  # Qwen2 uses NeoX-style rope: rows stay in HF order
}
LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
ROPE_FREQS = "rope_freqs.weight"  # llama.cpp's form of Llama 3.1 rope scaling, folded into config.json


def convert_gguf(gguf_path: Path, out_dir: Path, dtype: str = "auto", progress: bool = True) -> Path:
    """Writes a complete HF directory for a llama-family GGUF; returns out_dir.

    dtype "auto" means float32: every supported GGUF type dequantizes exactly into float32, while
    bfloat16 would round the dequantized values a second time.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    torch_dtype = torch.float32 if dtype == "auto" else DTYPES.get(dtype)
    if torch_dtype is None:
        raise LmforgeError(f"unknown dtype {dtype!r} for GGUF import; choose auto, {', '.join(DTYPES)}")
    reader, meta = open_gguf(gguf_path)
    tensors = {t.name: t for t in reader.tensors}
    cfg = hf_config(meta, tensors, gguf_path)
    cfg["torch_dtype"] = str(torch_dtype).removeprefix("torch.")
    tokenizer, tokenizer_config = build_tokenizer(meta, str(gguf_path), cfg["max_position_embeddings"])  # fail early
    state = read_state(reader, cfg, meta["general.architecture"], torch_dtype, gguf_path, progress)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_state_dict(state, out_dir)
    del state
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    generation = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in cfg}
    eot = meta.get("tokenizer.ggml.eot_token_id")  # chat models stop at end-of-turn as well as at eos
    if eot is not None and eot != cfg.get("eos_token_id"):
        generation["eos_token_id"] = [t for t in (cfg.get("eos_token_id"), int(eot)) if t is not None]
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    tokenizer.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n")
    return out_dir


def open_gguf(path: Path) -> tuple[GGUFReader, dict[str, Any]]:
    """The reader and its metadata as plain Python values; any damage becomes one LmforgeError naming the file."""
    if not path.is_file():
        raise LmforgeError(f"{path} does not exist; pass the path of a .gguf file")
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise LmforgeError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        reader = GGUFReader(path)
        meta = {name: field.contents() for name, field in reader.fields.items()}
    except Exception as e:  # GGUFReader fails on damaged files with ValueError, IndexError, KeyError, ...
        raise LmforgeError(f"{path} is truncated or corrupt (the GGUF reader failed: {e}); re-download it") from None
    if reader.byte_order != "I":
        raise LmforgeError(f"{path} is a big-endian GGUF file, which this importer does not read")
    size = len(reader.data)
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
            raise LmforgeError(f"{path} is truncated: tensor {t.name!r} needs bytes up to "
                               f"{t.data_offset + t.n_bytes}, the file has {size}; re-download it")
    return reader, meta


def hf_config(meta: dict[str, Any], tensors: dict[str, ReaderTensor], where: Path) -> dict:
    """config.json for the HF class matching general.architecture, from the `<arch>.*` metadata keys."""
    arch = meta.get("general.architecture")
    if arch not in FAMILIES:
        raise LmforgeError(f"{where}: GGUF architecture {arch!r} is not supported; supported: {', '.join(FAMILIES)}")

    def need(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise LmforgeError(f"{where} lacks the GGUF metadata key '{arch}.{key}'; the file is incomplete")
        if isinstance(value, list):  # some converters write per-layer values; the llama family has one
            raise LmforgeError(f"{where}: '{arch}.{key}' varies per layer, which {arch} models do not support")
        return value

    for name in ("token_embd.weight", "output_norm.weight"):
        if name not in tensors:
            raise LmforgeError(f"{where} has no tensor {name!r}; it is not a complete {arch} model")
    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    head_dim = need("attention.key_length", 0) or need("rope.dimension_count", 0) or hidden // heads
    hf_class, model_type, _ = FAMILIES[arch]
    cfg = {
        "architectures": [hf_class],
        "model_type": model_type,
        "vocab_size": int(tensors["token_embd.weight"].shape[1]),  # GGUF shapes list the fastest dimension first
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(need("attention.head_count_kv", heads)),
        "head_dim": int(head_dim),
        "hidden_act": "silu",
        "max_position_embeddings": int(need("context_length", 2048)),
        "rms_norm_eps": _f32(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(need("rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in tensors,
    }
    if model_type != "qwen2":  # HF Qwen2 always has q/k/v biases and no attention_bias field
        cfg["attention_bias"] = "blk.0.attn_q.bias" in tensors
        cfg["mlp_bias"] = False
    scaling = _rope_scaling(meta, arch, tensors.get(ROPE_FREQS), cfg, where)
    if scaling:
        cfg["rope_scaling"] = scaling
    for key in ("bos", "eos", "padding"):
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None:
            cfg[f"{'pad' if key == 'padding' else key}_token_id"] = int(token_id)
    return cfg


def _f32(value: float) -> float:
    """GGUF stores float32; the shortest decimal that rounds to it gives 1e-05 rather than 9.999999747378752e-06."""
    return float(str(np.float32(value)))


def _rope_scaling(meta: dict, arch: str, freqs: ReaderTensor | None, cfg: dict, where: Path) -> dict | None:
    kind = meta.get(f"{arch}.rope.scaling.type")
    if freqs is not None:
        return _llama3_scaling(np.asarray(dequantize(freqs.data, freqs.tensor_type), np.float64), cfg, where)
    if kind in (None, "none"):
        return None
    if kind not in ("linear", "yarn"):
        raise LmforgeError(f"{where}: rope scaling type {kind!r} is not supported; supported: linear, yarn")
    scaling = {"rope_type": kind, "factor": _f32(meta.get(f"{arch}.rope.scaling.factor", 1.0))}
    original = meta.get(f"{arch}.rope.scaling.original_context_length")
    if original:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling


def _llama3_scaling(divisors: np.ndarray, cfg: dict, where: Path) -> dict:
    """llama.cpp stores Llama 3.x rope scaling as one divisor per frequency; HF wants the formula's parameters.

    The factor is the largest divisor; the other three are the values Meta ships for every Llama 3.x,
    accepted only if they reproduce the stored divisors.
    """
    dim, theta = cfg["head_dim"], cfg["rope_theta"]
    params = {"rope_type": "llama3", "factor": _f32(divisors.max()), "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    factor, low, high, old = (params[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                                  "original_max_position_embeddings"))
    wavelen = 2 * math.pi * theta ** (np.arange(0, dim, 2) / dim)
    smooth = (old / wavelen - low) / (high - low)
    expected = np.where(wavelen < old / high, 1.0,
                        np.where(wavelen > old / low, factor, 1 / ((1 - smooth) / factor + smooth)))
    if expected.shape != divisors.shape or not np.allclose(expected, divisors, rtol=1e-3):
        raise LmforgeError(f"{where}: tensor {ROPE_FREQS!r} holds rope scaling that is not Llama 3's; "
                           "convert the original Hugging Face checkpoint instead")
    return params


def hf_name(name: str) -> str | None:
    """llama.cpp tensor name -> HF parameter name (None for a name the llama family does not have)."""
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if m:
        return f"model.layers.{m[1]}.{LAYER_NAMES[m[2]]}.{m[3]}" if m[2] in LAYER_NAMES else None
    base, _, kind = name.rpartition(".")
    return f"{GLOBAL_NAMES[base]}.{kind}" if base in GLOBAL_NAMES and kind in ("weight", "bias") else None


def unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of convert_hf_to_gguf's q/k permutation.

    HF rotates the two halves of each head (rotate_half); GGML's rope rotates adjacent pairs, so the
    converter interleaves each head's rows as (half, i) -> (i, half). Rows go back to (half, i) here.
    """
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def tensor_values(t: ReaderTensor, where: Path) -> torch.Tensor:
    """One GGUF tensor as float32 in HF layout ([out, in]), a fresh copy rather than a view of the file."""
    if t.tensor_type not in SUPPORTED_TYPES:
        raise LmforgeError(f"{where}: tensor {t.name!r} has GGML type {t.tensor_type.name}, which this importer "
                           f"cannot dequantize; supported: {', '.join(q.name for q in SUPPORTED_TYPES)}")
    values = dequantize(t.data, t.tensor_type)
    return torch.from_numpy(np.array(values, dtype=np.float32, copy=True))


def read_state(reader: GGUFReader, cfg: dict, arch: str, dtype: torch.dtype, where: Path,
               progress: bool = True) -> dict[str, torch.Tensor]:
    """Dequantizes tensor by tensor into the HF state dict, checked against the model config.json describes."""
    cls, args = build_args(cfg, str(where))
    with torch.device("meta"):
        expected = {n: tuple(p.shape) for n, p in cls(args).named_parameters()}  # a tied lm_head appears once
    permuted = FAMILIES[arch][2]
    heads = {"q_proj": cfg["num_attention_heads"], "k_proj": cfg["num_key_value_heads"]}
    state: dict[str, torch.Tensor] = {}
    for t in tqdm(reader.tensors, desc=f"importing {where.name}", unit=" tensors",
                  disable=None if progress else True):
        if t.name == ROPE_FREQS:
            continue
        name = hf_name(t.name)
        if name is None or name not in expected:
            raise LmforgeError(f"{where}: tensor {t.name!r} has no place in a {arch} model with this metadata")
        w = tensor_values(t, where)
        if tuple(w.shape) != expected[name]:
            raise LmforgeError(f"{where}: tensor {t.name!r} has shape {tuple(w.shape)}, "
                               f"the file's metadata implies {expected[name]}")
        proj = name.split(".")[-2]
        if permuted and proj in heads:
            w = unpermute(w, heads[proj])
        state[name] = w.to(dtype)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise LmforgeError(f"{where} lacks {len(missing)} tensor(s) the model needs, first {missing[0]!r}")
    return state
