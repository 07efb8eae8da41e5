"""Llama 2/3/3.1/3.2, Mistral, SmolLM2, Qwen2/2.5: one decoder, configured from the HF config's own fields."""

from dataclasses import dataclass

import torch
from torch import nn

from lmforge.layers.attention import AttnMeta, KVCache, attention
from lmforge.layers.decoder import Decoder
from lmforge.layers.linear import Linear, linears
from lmforge.layers.mlp import GatedMLP
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
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    rope: RopeConfig
    windows: tuple[int | None, ...]

    @classmethod
    def from_hf(cls, cfg: dict) -> "Args":
        heads = need(cfg, "num_attention_heads")
        hidden = need(cfg, "hidden_size")
        layers = need(cfg, "num_hidden_layers")
        head_dim = cfg.get("head_dim") or hidden // heads
        qwen2 = "Qwen2ForCausalLM" in cfg.get("architectures", [])
        return cls(
            vocab_size=need(cfg, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=need(cfg, "intermediate_size"),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            hidden_act=cfg.get("hidden_act", "silu"),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            qkv_bias=cfg.get("attention_bias", qwen2),  # Qwen2 always has q/k/v biases
            o_bias=cfg.get("attention_bias", False),
            mlp_bias=cfg.get("mlp_bias", False),
            rope=RopeConfig.from_hf(cfg, head_dim),
            windows=tuple(sliding_windows(cfg, layers)),
        )


class Attention(nn.Module):
    def __init__(self, a: Args, window: int | None):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = a.num_attention_heads, a.num_key_value_heads, a.head_dim
        self.window = window
        self.q_proj = Linear(a.hidden_size, self.heads * a.head_dim, bias=a.qkv_bias)
        self.k_proj = Linear(a.hidden_size, self.kv_heads * a.head_dim, bias=a.qkv_bias)
        self.v_proj = Linear(a.hidden_size, self.kv_heads * a.head_dim, bias=a.qkv_bias)
        self.o_proj = Linear(self.heads * a.head_dim, a.hidden_size, bias=a.o_bias)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], meta: AttnMeta,
                kv: KVCache | None) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = linears(x, self.q_proj, self.k_proj, self.v_proj, lora=meta.lora)
        q = apply_rope(q.view(t, self.heads, self.head_dim), *rope)
        k = apply_rope(k.view(t, self.kv_heads, self.head_dim), *rope)
        v = v.view(t, self.kv_heads, self.head_dim)
        out = attention(q, k, v, meta, kv, self.head_dim**-0.5, self.window)
        return self.o_proj(out.reshape(t, -1), meta.lora)


class Block(nn.Module):
    def __init__(self, a: Args, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.self_attn = Attention(a, a.windows[layer])
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.mlp = GatedMLP(a.hidden_size, a.intermediate_size, a.hidden_act, a.mlp_bias)

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
