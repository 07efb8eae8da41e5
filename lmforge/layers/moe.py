"""Top-k mixture of experts: softmax routing and a dispatch that runs each expert once on the tokens it received.

Family files own the modules (their checkpoint names differ: `block_sparse_moe.experts.0.w1` in Mixtral,
`mlp.experts.0.gate_proj` in Qwen); these two functions are the arithmetic they share.
"""

import torch
from torch import nn


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> (weights [T, k] fp32, expert indices [T, k]).

    Softmax over all experts in fp32, then the top k; `renormalize` rescales the k weights to sum to one
    (Mixtral always, Qwen when `norm_topk_prob`). Callers cast the weights where their family does.
    """
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, indices = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, indices


def dispatch(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, experts: nn.ModuleList) -> torch.Tensor:
    """x [T, H], weights/indices [T, k] -> [T, H]: sum over k of weight * experts[index](x).

    Token slots are sorted by expert once, so each expert that received tokens runs one batched call;
    the per-expert counts cost one host sync per layer (no per-token or per-expert syncs).
    """
    top_k = indices.shape[1]
    flat = indices.flatten()
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=len(experts)).tolist()
    tokens = (order // top_k).split(counts)
    slot_weights = weights.flatten()[order].split(counts)
    # Sum the k contributions in fp32 and round once, as transformers' default (grouped_mm) experts path does;
    # the product itself takes the weights' dtype (fp32 for Mixtral, the model dtype for Qwen).
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for expert, idx, w in zip(experts, tokens, slot_weights, strict=True):
        if idx.numel():
            out.index_add_(0, idx, (expert(x[idx]) * w[:, None]).float())
    return out.to(x.dtype)
