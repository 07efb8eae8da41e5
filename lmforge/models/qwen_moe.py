"""Qwen1.5-MoE / Qwen2-MoE and Qwen3-MoE: a Qwen decoder whose MLP is, on sparse layers, a top-k MoE.

The two generations differ in three places, read from `architectures`: Qwen2-MoE has q/k/v biases and a
shared expert behind a sigmoid gate; Qwen3-MoE has a per-head q/k RMSNorm before rope and no shared expert.
Both put experts at `mlp.experts.N.{gate,up,down}_proj` and the router at `mlp.gate`; layers listed in
`mlp_only_layers`, or off the `decoder_sparse_step` stride, keep a dense `mlp`.
"""

from dataclasses import dataclass

import torch
from torch import nn

from lmforge.layers.attention import AttnMeta, KVCache, attention
from lmforge.layers.decoder import Decoder
from lmforge.layers.linear import Linear, linears
from lmforge.layers.mlp import GatedMLP
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
    rms_norm_eps: float
    hidden_act: str
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    qk_norm: bool
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    shared_expert_intermediate_size: int  # 0: no shared expert
    norm_topk_prob: bool
    sparse: tuple[bool, ...]  # per layer: MoE (True) or dense MLP
    rope: RopeConfig
    windows: tuple[int | None, ...]

    @classmethod
    def from_hf(cls, cfg: dict) -> "Args":
        heads = need(cfg, "num_attention_heads")
        hidden = need(cfg, "hidden_size")
        layers = need(cfg, "num_hidden_layers")
        head_dim = cfg.get("head_dim") or hidden // heads
        qwen3 = "Qwen3MoeForCausalLM" in cfg.get("architectures", [])
        # transformers v5 writes Qwen3-MoE's count as num_local_experts; released checkpoints say num_experts
        experts = cfg["num_local_experts"] if "num_local_experts" in cfg else need(cfg, "num_experts")
        step, dense_layers = cfg.get("decoder_sparse_step", 1), set(cfg.get("mlp_only_layers") or [])
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
            qkv_bias=cfg.get("attention_bias", False) if qwen3 else cfg.get("qkv_bias", True),
            o_bias=cfg.get("attention_bias", False) if qwen3 else False,
            qk_norm=qwen3,
            num_experts=experts,
            num_experts_per_tok=need(cfg, "num_experts_per_tok"),
            moe_intermediate_size=need(cfg, "moe_intermediate_size"),
            shared_expert_intermediate_size=0 if qwen3 else need(cfg, "shared_expert_intermediate_size"),
            norm_topk_prob=cfg.get("norm_topk_prob", False),
            sparse=tuple(i not in dense_layers and experts > 0 and (i + 1) % step == 0 for i in range(layers)),
            rope=RopeConfig.from_hf(cfg, head_dim),
            windows=tuple(_windows(cfg, layers, qwen3)),
        )


def _windows(cfg: dict, layers: int, qwen3: bool) -> list[int | None]:
    """Each config class's own rule for which layers slide (no released checkpoint enables sliding)."""
    if qwen3:  # Qwen3MoeConfig: every layer, when use_sliding_window
        return [cfg.get("sliding_window") if cfg.get("use_sliding_window") else None] * layers
    if cfg.get("layer_types") is None and cfg.get("use_sliding_window"):  # Qwen2MoeConfig: even layers, then full
        limit = cfg.get("max_window_layers", 28)
        types = ["sliding_attention" if i % 2 == 0 and i < limit else "full_attention" for i in range(layers)]
        cfg = {**cfg, "layer_types": types}
    return sliding_windows(cfg, layers)


class Attention(nn.Module):
    def __init__(self, a: Args, window: int | None):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = a.num_attention_heads, a.num_key_value_heads, a.head_dim
        self.window = window
        self.q_proj = Linear(a.hidden_size, self.heads * a.head_dim, bias=a.qkv_bias)
        self.k_proj = Linear(a.hidden_size, self.kv_heads * a.head_dim, bias=a.qkv_bias)
        self.v_proj = Linear(a.hidden_size, self.kv_heads * a.head_dim, bias=a.qkv_bias)
        self.o_proj = Linear(self.heads * a.head_dim, a.hidden_size, bias=a.o_bias)
        if a.qk_norm:
            self.q_norm = RMSNorm(a.head_dim, a.rms_norm_eps)
            self.k_norm = RMSNorm(a.head_dim, a.rms_norm_eps)
        self.qk_norm = a.qk_norm

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], meta: AttnMeta,
                kv: KVCache | None) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = linears(x, self.q_proj, self.k_proj, self.v_proj, lora=meta.lora)
        q, k, v = q.view(t, self.heads, self.head_dim), k.view(t, self.kv_heads, self.head_dim), \
            v.view(t, self.kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        out = attention(apply_rope(q, *rope), apply_rope(k, *rope), v, meta, kv, self.head_dim**-0.5, self.window)
        return self.o_proj(out.reshape(t, -1), meta.lora)


class SparseMoE(nn.Module):
    def __init__(self, a: Args):
        super().__init__()
        self.top_k, self.norm_topk_prob = a.num_experts_per_tok, a.norm_topk_prob
        self.gate = Linear(a.hidden_size, a.num_experts, bias=False)
        self.experts = nn.ModuleList(
            GatedMLP(a.hidden_size, a.moe_intermediate_size, a.hidden_act) for _ in range(a.num_experts))
        self.has_shared = a.shared_expert_intermediate_size > 0
        if self.has_shared:
            self.shared_expert = GatedMLP(a.hidden_size, a.shared_expert_intermediate_size, a.hidden_act)
            self.shared_expert_gate = Linear(a.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor, lora=None) -> torch.Tensor:
        """`lora`: the step's LoraBatch, for the shared expert (serving adapters never adapt routed experts)."""
        weights, indices = route(self.gate(x), self.top_k, self.norm_topk_prob)
        out = dispatch(x, weights.to(x.dtype), indices, self.experts)  # Qwen scales in the model dtype
        if self.has_shared:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x, lora)
        return out


class Block(nn.Module):
    def __init__(self, a: Args, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.self_attn = Attention(a, a.windows[layer])
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.mlp = SparseMoE(a) if a.sparse[layer] else GatedMLP(a.hidden_size, a.intermediate_size, a.hidden_act)

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
