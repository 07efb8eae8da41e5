"""int8 KV cache: the quantisation the paged cache stores (`kv_cache_dtype="int8"`), in pure torch.

Each key or value row (one token, one kv head: `head_dim` numbers) is stored as int8 with its own float32 scale,
symmetric absmax / 127, rounded to nearest (ties to even). Per (token, kv head) because the paged cache is written
one token at a time: a scale per block would change when a later token of the block arrives and force the block's
earlier rows to be requantised. The scale costs 4 bytes per row: 68 bytes per row of 64 instead of 128 (bfloat16)
or 256 (float32). The CPU kernels (`write_kv`, `paged_attention` in lmforge/kernels/paged_attention.cpp) compute
the same numbers; this file is their reference and the path of every other device.
"""

import torch

KV_CACHE_DTYPES = ("auto", "int8")  # "auto": the model's dtype


def kv_storage_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype the paged pool stores keys and values in."""
    if kv_cache_dtype == "int8":
        return torch.int8
    if kv_cache_dtype == "auto":
        return model_dtype
    raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {kv_cache_dtype!r}")


def kv_row_bytes(head_dim: int, storage: torch.dtype) -> int:
    """Bytes one token's key (or value) row of one kv head takes in the pool, its scale included."""
    return head_dim * storage.itemsize + (4 if storage == torch.int8 else 0)


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (int8 [..., D], float32 scale [...]) with x ~ q * scale; an all-zero row gets scale 0."""
    x = x.float()
    scale = x.abs().amax(-1) / 127
    q = torch.where(scale[..., None] > 0, x / scale[..., None], 0.0).round_().clamp_(-127, 127)
    return q.to(torch.int8), scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8 [..., D] and float32 scale [...] -> [..., D] in dtype."""
    return (q.float() * scale[..., None]).to(dtype)
