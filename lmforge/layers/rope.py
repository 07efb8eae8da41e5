"""Rotary position embeddings with the scaling variants Hugging Face configs name.

`rope_type`: default, linear, dynamic (NTK), llama3, yarn, longrope. Frequencies are computed in fp32.
dynamic and longrope depend on the longest position in the current forward (stateless, unlike
Hugging Face's module, which remembers the longest length it has seen).
"""

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.kernels import usable
from lmforge.layers import train_kernels

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")


@dataclass(frozen=True)
class RopeConfig:
    rope_type: str
    theta: float
    rotary_dim: int
    max_position: int
    params: dict = field(default_factory=dict, hash=False, compare=False)

    @classmethod
    def from_hf(cls, cfg: dict, head_dim: int) -> "RopeConfig":
        """Reads both spellings: transformers v5 `rope_parameters` and v4 `rope_theta` + `rope_scaling`."""
        params = dict(cfg.get("rope_parameters") or {})
        if not params or "rope_theta" not in params:
            params = {**(cfg.get("rope_scaling") or {}), **params}
            params.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
        rope_type = params.get("rope_type", params.get("type", "default"))
        rope_type = {"su": "longrope", "mrope": "default"}.get(rope_type, rope_type)
        if rope_type not in ROPE_TYPES:
            raise LmforgeError(f"config.json: unsupported rope_type {rope_type!r}; supported: {', '.join(ROPE_TYPES)}")
        if rope_type in ("llama3", "yarn", "longrope") and cfg.get("original_max_position_embeddings"):
            # Phi-3 configs keep the pretraining length beside rope_scaling; transformers gives it priority
            params["original_max_position_embeddings"] = cfg["original_max_position_embeddings"]
        partial = cfg.get("partial_rotary_factor", params.get("partial_rotary_factor", 1.0))
        return cls(rope_type, float(params["rope_theta"]), int(head_dim * partial),
                   int(cfg.get("max_position_embeddings", 2048)), params)


def _base_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _llama3(c: RopeConfig, inv_freq: torch.Tensor) -> torch.Tensor:
    p = c.params
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_len = p["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


def _yarn(c: RopeConfig) -> tuple[torch.Tensor, float]:
    p, dim, base = c.params, c.rotary_dim, c.theta
    original = p.get("original_max_position_embeddings") or c.max_position
    factor = p.get("factor") or c.max_position / original

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = p.get("attention_factor")
    if attn is None:
        m, m_all = p.get("mscale"), p.get("mscale_all_dim")
        attn = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(p.get("beta_fast") or 32), correction_dim(p.get("beta_slow") or 1)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attn)


def _longrope(c: RopeConfig, seq_len: int) -> tuple[torch.Tensor, float]:
    p, dim = c.params, c.rotary_dim
    original = p.get("original_max_position_embeddings") or c.max_position
    factor = p.get("factor") or c.max_position / original
    attn = p.get("attention_factor")
    if attn is None:
        attn = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    ext = torch.tensor(p["long_factor"] if seq_len > original else p["short_factor"], dtype=torch.float32)
    return 1.0 / (ext * c.theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)), float(attn)


def inv_freq_for(c: RopeConfig, seq_len: int) -> tuple[torch.Tensor, float]:
    """(inverse frequencies, attention scaling) for a forward whose longest position is seq_len - 1."""
    if c.rope_type == "yarn":
        return _yarn(c)
    if c.rope_type == "longrope":
        return _longrope(c, seq_len)
    base = c.theta
    if c.rope_type == "dynamic" and seq_len > c.max_position:
        factor, dim = c.params["factor"], c.rotary_dim
        base = base * ((factor * seq_len / c.max_position) - (factor - 1)) ** (dim / (dim - 2))
    inv_freq = _base_inv_freq(base, c.rotary_dim)
    if c.rope_type == "linear":
        inv_freq = inv_freq / c.params["factor"]
    elif c.rope_type == "llama3":
        inv_freq = _llama3(c, inv_freq)
    return inv_freq, 1.0


class Rotary(nn.Module):
    """Turns positions [T] into (cos, sin) [T, rotary_dim]; holds no parameters or buffers."""

    def __init__(self, config: RopeConfig):
        super().__init__()
        self.config = config
        self._cache: dict[torch.device, tuple[torch.Tensor, float]] = {}

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self.config.rope_type in ("dynamic", "longrope"):
            inv_freq, scale = inv_freq_for(self.config, int(positions.max()) + 1 if positions.numel() else 0)
            inv_freq = inv_freq.to(positions.device)
        else:
            if positions.device not in self._cache:
                inv_freq, scale = inv_freq_for(self.config, 0)
                self._cache[positions.device] = (inv_freq.to(positions.device), scale)
            inv_freq, scale = self._cache[positions.device]
        freqs = positions.float()[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]; rotates the first rotary_dim features (half-split layout, as HF stores them).
    Inference tensors on CPU are rotated in place by one kernel; callers pass a fresh projection. In training on CPU
    a kernel rotates out of place (its backward rotates back)."""
    if (out := train_kernels.rope(x, cos, sin)) is not None:
        return out
    if x.dtype == cos.dtype and x.stride(-1) == 1 and x.stride(-2) == x.shape[-1] and (ops := usable(x)) is not None:
        return ops.rope_(x, cos, sin)
    rot = cos.shape[-1]
    cos, sin = cos[:, None, :], sin[:, None, :]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    x1, x2 = x_rot[..., : rot // 2], x_rot[..., rot // 2 :]
    rotated = x_rot * cos + torch.cat((-x2, x1), dim=-1) * sin
    return torch.cat((rotated, x_pass), dim=-1) if x_pass.shape[-1] else rotated
