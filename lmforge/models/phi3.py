"""Phi-3 / Phi-3.5 / Phi-4-mini: a Llama-shaped decoder whose checkpoints store fused qkv_proj and gate_up_proj.

The fused names are what the checkpoint holds, so they are the module names here too. Rope may be partial
(`partial_rotary_factor`) and longrope-scaled; both live in lmforge/layers/rope.py.
"""

from dataclasses import dataclass

import torch
from torch import nn

from lmforge.layers.activation import activation
from lmforge.layers.attention import AttnMeta, KVCache, attention
from lmforge.layers.decoder import Decoder
from lmforge.layers.linear import Linear
from lmforge.layers.norm import RMSNorm
from lmforge.layers.rope import RopeConfig, apply_rope
from lmforge.models.config import need, sliding_windows


@dataclass(frozen=True)
class Args:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    hidden_act: str
    tie_word_embeddings: bool
    rope: RopeConfig
    windows: tuple[int | None, ...]

    @classmethod
    def from_hf(cls, cfg: dict) -> "Args":
        heads = need(cfg, "num_attention_heads")
        hidden = need(cfg, "hidden_size")
        layers = need(cfg, "num_hidden_layers")
        head_dim = cfg.get("head_dim") or hidden // heads
        return cls(
            vocab_size=need(cfg, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=need(cfg, "intermediate_size"),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
            hidden_act=cfg.get("hidden_act", "silu"),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            rope=RopeConfig.from_hf(cfg, head_dim),
            windows=tuple(sliding_windows(cfg, layers)),  # one window for every layer when set
        )


class Attention(nn.Module):
    def __init__(self, a: Args, window: int | None):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = a.num_attention_heads, a.num_key_value_heads, a.head_dim
        self.window = window
        self.qkv_proj = Linear(a.hidden_size, (self.heads + 2 * self.kv_heads) * a.head_dim, bias=False)
        self.o_proj = Linear(self.heads * a.head_dim, a.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], meta: AttnMeta,
                kv: KVCache | None) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(x, meta.lora).view(t, -1, self.head_dim)
        q, k, v = qkv.split([self.heads, self.kv_heads, self.kv_heads], 1)
        out = attention(apply_rope(q, *rope), apply_rope(k, *rope), v, meta, kv, self.head_dim**-0.5, self.window)
        return self.o_proj(out.reshape(t, -1), meta.lora)


class MLP(nn.Module):
    """down(act(gate) * up) with gate and up as the two halves of one gate_up_proj output, gate first."""

    def __init__(self, a: Args):
        super().__init__()
        self.gate_up_proj = Linear(a.hidden_size, 2 * a.intermediate_size, bias=False)
        self.down_proj = Linear(a.intermediate_size, a.hidden_size, bias=False)
        self.act = activation(a.hidden_act)

    def forward(self, x: torch.Tensor, lora=None) -> torch.Tensor:
        gate, up = self.gate_up_proj(x, lora).chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up, lora)


class Block(nn.Module):
    def __init__(self, a: Args, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.self_attn = Attention(a, a.windows[layer])
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.mlp = MLP(a)

    def forward(self, x, rope, meta, kv):
        x = x + self.self_attn(self.input_layernorm(x), rope, meta, kv)
        return x + self.mlp(self.post_attention_layernorm(x), meta.lora)


class Model(nn.Module):
    """forward(input_ids [T], positions [T], meta, kv=None) -> hidden [T, hidden]; logits(hidden) -> fp32."""

    Args = Args

    def __init__(self, args: Args):
        super().__init__()
        self.args = args
        self.model = Decoder(args, Block)
        self.lm_head = Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttnMeta,
                kv: list[KVCache] | None = None) -> torch.Tensor:
        return self.model(input_ids, positions, meta, kv)

    def logits(self, hidden: torch.Tensor, float32: bool = True) -> torch.Tensor:
        out = self.lm_head(hidden)
        return out.float() if float32 else out
