"""Mixtral: the Mistral decoder with a top-k sparse MoE (`block_sparse_moe`) in place of the MLP.

Module names follow the checkpoint (`block_sparse_moe.experts.N.w1/w2/w3`), not transformers v5's in-memory
fused experts. Routing weights stay fp32 until they scale the expert outputs, as Hugging Face computes them.
"""

from dataclasses import dataclass

import torch
from torch import nn

from lmforge.layers.activation import activation
from lmforge.layers.attention import AttnMeta, KVCache, attention
from lmforge.layers.decoder import Decoder
from lmforge.layers.linear import Linear, linears
from lmforge.layers.moe import dispatch, route
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
    num_local_experts: int
    num_experts_per_tok: int
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
            num_local_experts=cfg.get("num_experts") or need(cfg, "num_local_experts"),  # v5 aliases the two
            num_experts_per_tok=need(cfg, "num_experts_per_tok"),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
            hidden_act=cfg.get("hidden_act", "silu"),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            rope=RopeConfig.from_hf(cfg, head_dim),
            windows=tuple(sliding_windows(cfg, layers)),
        )


class Attention(nn.Module):
    def __init__(self, a: Args, window: int | None):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = a.num_attention_heads, a.num_key_value_heads, a.head_dim
        self.window = window
        self.q_proj = Linear(a.hidden_size, self.heads * a.head_dim, bias=False)
        self.k_proj = Linear(a.hidden_size, self.kv_heads * a.head_dim, bias=False)
        self.v_proj = Linear(a.hidden_size, self.kv_heads * a.head_dim, bias=False)
        self.o_proj = Linear(self.heads * a.head_dim, a.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], meta: AttnMeta,
                kv: KVCache | None) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = linears(x, self.q_proj, self.k_proj, self.v_proj, lora=meta.lora)
        q = apply_rope(q.view(t, self.heads, self.head_dim), *rope)
        k = apply_rope(k.view(t, self.kv_heads, self.head_dim), *rope)
        v = v.view(t, self.kv_heads, self.head_dim)
        out = attention(q, k, v, meta, kv, self.head_dim**-0.5, self.window)
        return self.o_proj(out.reshape(t, -1), meta.lora)


class Expert(nn.Module):
    """w2(act(w1(x)) * w3(x)): w1 is the gate, w3 the up projection, w2 the down projection."""

    def __init__(self, a: Args):
        super().__init__()
        self.w1 = Linear(a.hidden_size, a.intermediate_size, bias=False)
        self.w2 = Linear(a.intermediate_size, a.hidden_size, bias=False)
        self.w3 = Linear(a.hidden_size, a.intermediate_size, bias=False)
        self.act = activation(a.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act(self.w1(x)) * self.w3(x))


class SparseMoE(nn.Module):
    def __init__(self, a: Args):
        super().__init__()
        self.top_k = a.num_experts_per_tok
        self.gate = Linear(a.hidden_size, a.num_local_experts, bias=False)
        self.experts = nn.ModuleList(Expert(a) for _ in range(a.num_local_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, indices = route(self.gate(x), self.top_k, renormalize=True)
        return dispatch(x, weights, indices, self.experts)


class Block(nn.Module):
    def __init__(self, a: Args, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.self_attn = Attention(a, a.windows[layer])
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.block_sparse_moe = SparseMoE(a)

    def forward(self, x, rope, meta, kv):
        x = x + self.self_attn(self.input_layernorm(x), rope, meta, kv)
        return x + self.block_sparse_moe(self.post_attention_layernorm(x))


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
