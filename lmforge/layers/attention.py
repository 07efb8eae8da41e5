"""Attention over a flat token batch; hot path — keep minimal.

Every batch is flat: tokens of all sequences laid end to end, `[num_tokens, heads, head_dim]`.
`AttnMeta` says which tokens belong together and, when a paged KV cache is passed, where new keys
and values are written and where each sequence's earlier ones live. Models pass it through
untouched, so the serving engine's paged path needs no change to any model file.
"""

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from lmforge import kernels
from lmforge.kernels import usable
from lmforge.layers import flex
from lmforge.layers.kv_quant import dequantize_int8, quantize_int8
from lmforge.layers.train_kernels import causal_attention, kernel_attention
from lmforge.layers.varlen import grouped_attention, prefix_sources

if TYPE_CHECKING:
    from lmforge.layers.multi_lora import LoraBatch

# One layer's paged cache: (keys, values), each [num_blocks, block_size, kv_heads, head_dim]; an int8 cache
# (lmforge/layers/kv_quant.py) adds their float32 scales: (keys, values, key scales, value scales), the scales
# [num_blocks, block_size, kv_heads].
KVCache = tuple[torch.Tensor, ...]
# Which sequences of a paged step the CPU kernel attends: decodes and short chunks, and short prompts, where
# a per-sequence SDPA call costs more in overhead than the kernel's plain loops (benchmarks/cpu_kernels.py).
KERNEL_MAX_QUERIES = 4
KERNEL_MAX_WORK = 4096  # query tokens x keys


@dataclass(frozen=True, slots=True)
class KernelRows:
    """The sequences of a paged step that the CPU paged-attention kernel handles, as the int64 tensors it reads."""

    rows: tuple[int, ...]
    rows_t: torch.Tensor  # [R] their indices among the step's sequences
    cu_q: torch.Tensor  # [num_seqs + 1]
    seqlens_k: torch.Tensor  # [num_seqs]


@dataclass(frozen=True, slots=True)
class DecodeBatch:
    """The single-token sequences of a paged step, attended in one padded SDPA call instead of one each."""

    rows: tuple[int, ...]  # their indices among the step's sequences
    token_idx: torch.Tensor  # [B] position of each one's token in the flat batch
    block_tables: torch.Tensor  # [B, blocks] covering the longest context
    key_mask: torch.Tensor  # [B, 1, 1, blocks * block_size] True where a key exists


@dataclass(frozen=True, slots=True)
class StaticDecode:
    """A decode step of fixed shapes, as a CUDA graph replays it (engine/cuda_graph.py): every sequence has one new
    token, block tables are padded to the most blocks a sequence may have, and the key masks are built on the device
    from the lengths, so nothing in the step waits for the host."""

    block_tables: torch.Tensor  # [B, max_blocks]
    seqlens_k: torch.Tensor  # [B] on the device: keys of each sequence, its new token's included


@dataclass(frozen=True, slots=True)
class AttnMeta:
    cu_seqlens_q: torch.Tensor  # [num_seqs + 1] int32 offsets of each sequence's new tokens in the flat batch
    seqlens_q: tuple[int, ...]  # new tokens per sequence (host copy: no device sync in the loop)
    seqlens_k: tuple[int, ...]  # tokens each sequence attends to: cached context + new tokens
    slot_mapping: torch.Tensor | None = None  # [num_tokens] flat cache slot (block * block_size + offset) per new token
    block_tables: torch.Tensor | None = None  # [num_seqs, max_blocks] physical blocks of each sequence, in order
    logits_indices: torch.Tensor | None = None  # rows of the hidden states whose logits the caller wants
    decode: DecodeBatch | None = None  # single-token sequences batched together (paged, pure-torch path)
    kernel: KernelRows | None = None  # short-query sequences for the CPU kernel (paged, kernels available)
    lora: "LoraBatch | None" = None  # the step's LoraBatch (multi-LoRA serving); None: no token uses an adapter
    # packed documents without a cache: how many first tokens of the last document before it without a prefix each
    # attends to before its own (a shared prompt: a preference pair's, a GRPO group's); None: none
    prefixes: tuple[int, ...] | None = None
    static: StaticDecode | None = None  # a fixed-shape decode step (CUDA graphs)
    flex: "flex.FlexStep | flex.FlexDocs | None" = None  # the whole step through FlexAttention (CUDA)

    @classmethod
    def for_training(cls, cu_seqlens: torch.Tensor, prefix_lens: torch.Tensor | None = None) -> "AttnMeta":
        """Packed documents without a cache: each attends causally within itself only, after the first
        prefix_lens[i] tokens of the last document before it whose prefix is 0, where given (data/loader.py
        Batch.prefix_lens): a preference pair's rejected answer reads the chosen document's prompt, each completion
        of a GRPO group the group's first document's."""
        lens = tuple((cu_seqlens[1:] - cu_seqlens[:-1]).tolist())
        docs = flex.FlexDocs.build(lens, None, cu_seqlens.device) if flex.enabled(cu_seqlens.device) else None
        if prefix_lens is None:
            return cls(cu_seqlens.to(torch.int32), lens, lens, flex=docs)
        prefixes = tuple(prefix_lens.tolist())
        sources = prefix_sources(prefixes)
        if len(prefixes) != len(lens) or any(
                p and not (s is not None and 0 < p <= lens[s]) for p, s in zip(prefixes, sources, strict=True)):
            raise ValueError(f"prefix_lens {prefixes} do not fit documents of {lens} tokens: document i may attend "
                             "to at most the length of the last document before it without a prefix, and the first "
                             "has none before it")
        if docs is not None:
            docs = flex.FlexDocs.build(lens, prefixes, cu_seqlens.device)
        return cls(cu_seqlens.to(torch.int32), lens, tuple(p + n for p, n in zip(prefixes, lens, strict=True)),
                   prefixes=prefixes, flex=docs)

    @classmethod
    def for_sequences(cls, seqlens: list[int], device: torch.device | str = "cpu") -> "AttnMeta":
        cu = torch.zeros(len(seqlens) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(seqlens, dtype=torch.int32).cumsum(0)
        return cls(cu.to(device), tuple(seqlens), tuple(seqlens))

    @classmethod
    def for_paged(cls, seqlens_q: list[int], seqlens_k: list[int], slot_mapping: torch.Tensor,
                  block_tables: torch.Tensor, logits_indices: torch.Tensor | None = None,
                  block_size: int | None = None, num_blocks: int | None = None) -> "AttnMeta":
        """New tokens of several sequences whose keys and values go into (and come from) a paged cache.
        With block_size given, sequences with one new token are attended in one batched call; with num_blocks (the
        pool's) too, on a device FlexAttention serves, the whole step in one call (layers/flex.py)."""
        device = slot_mapping.device
        cu = torch.zeros(len(seqlens_q) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(seqlens_q, dtype=torch.int32).cumsum(0)
        if block_size is not None and num_blocks is not None and flex.enabled(device):
            step = flex.FlexStep.build(seqlens_q, seqlens_k, block_tables, num_blocks, block_size)
            return cls(cu.to(device), tuple(seqlens_q), tuple(seqlens_k), slot_mapping, block_tables, logits_indices,
                       flex=step)
        decode = kernel = None
        if kernels.available(device) is not None:  # in bitwise mode every sequence (as training's attention)
            rows = tuple(i for i, (n, lk) in enumerate(zip(seqlens_q, seqlens_k, strict=True))
                         if n <= KERNEL_MAX_QUERIES or n * lk <= KERNEL_MAX_WORK or kernels.in_bitwise())
            if rows:
                kernel = KernelRows(rows, torch.tensor(rows), cu.long(), torch.tensor(seqlens_k))
        elif block_size is not None:
            rows = tuple(i for i, n in enumerate(seqlens_q) if n == 1)
            if len(rows) > 1:
                lens = torch.tensor([seqlens_k[i] for i in rows])
                blocks = -(-int(lens.max()) // block_size)
                key_mask = torch.arange(blocks * block_size)[None, :] < lens[:, None]
                decode = DecodeBatch(rows, cu[list(rows)].to(device), block_tables[list(rows), :blocks],
                                     key_mask[:, None, None, :].to(device))
        return cls(cu.to(device), tuple(seqlens_q), tuple(seqlens_k), slot_mapping, block_tables, logits_indices,
                   decode, kernel)

    @property
    def num_tokens(self) -> int:
        return sum(self.seqlens_q)


def _mask(lq: int, lk: int, window: int | None, device: torch.device) -> torch.Tensor | None:
    """Boolean [lq, lk] mask for queries that are the last lq of lk positions; None when plain causal will do."""
    if window is None or lk <= window:
        if lq == lk or lq == 1:
            return None
    q_pos = torch.arange(lk - lq, lk, device=device)[:, None]
    k_pos = torch.arange(lk, device=device)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= q_pos - k_pos < window
    return allowed


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int | None) -> torch.Tensor:
    """q [B, lq, H, D], k/v [B, lk, KVH, D] -> [B, lq, H, D], causal aligned to the last query."""
    lq, lk = q.shape[1], k.shape[1]
    mask = _mask(lq, lk, window, q.device)
    if mask is None and lq == lk and (out := causal_attention(q, k, v, scale)) is not None:
        return out
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
        is_causal=mask is None and lq == lk and lq > 1, scale=scale, enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttnMeta, kv: KVCache | None,
              scale: float, window: int | None = None) -> torch.Tensor:
    """q [T, H, D], k/v [T, KVH, D] for the new tokens -> [T, H, D]."""
    if kv is not None:
        return _paged_attention(q, k, v, meta, kv, scale, window)
    if meta.flex is not None:  # packed documents on the GPU (for_training)
        return flex.packed_attention(q, k, v, meta.flex, scale, window)
    lens = meta.seqlens_q
    if kernels.in_bitwise():  # the engine's kernel, in the engine's order (torch's path gives its gradient)
        reference = partial(_varlen, lens=lens, prefixes=meta.prefixes, scale=scale, window=window)
        if (out := kernel_attention(q, k, v, lens, meta.prefixes, scale, window, reference)) is not None:
            return out
    return _varlen(q, k, v, lens, meta.prefixes, scale, window)


def _varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: tuple[int, ...], prefixes: tuple[int, ...] | None,
            scale: float, window: int | None) -> torch.Tensor:
    if len(set(lens)) == 1 and prefixes is None:  # equal lengths: one batched call
        b = len(lens)
        out = _sdpa(q.view(b, lens[0], *q.shape[1:]), k.view(b, lens[0], *k.shape[1:]),
                    v.view(b, lens[0], *v.shape[1:]), scale, window)
        return out.reshape(q.shape)
    return grouped_attention(q, k, v, lens, lambda qb, kb, vb: _sdpa(qb, kb, vb, scale, window), prefixes)


def _write_cache(kv: KVCache, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    for i, x in enumerate((k, v)):
        cache = kv[i].view(-1, *kv[i].shape[2:])
        if len(kv) == 2:
            cache[slots] = x.to(cache.dtype)
        else:
            cache[slots], kv[i + 2].view(-1, kv[i + 2].shape[2])[slots] = quantize_int8(x)


def _read_cache(kv: KVCache, i: int, blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Keys (i = 0) or values (i = 1) of the given blocks, in dtype (an int8 cache dequantised)."""
    rows = kv[i][blocks]
    return rows.to(dtype) if len(kv) == 2 else dequantize_int8(rows, kv[i + 2][blocks], dtype)


def _paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttnMeta, kv: KVCache,
                     scale: float, window: int | None) -> torch.Tensor:
    # The GPU paths write finite values only: FlexAttention does not zero a masked slot of a tile it reads, so one
    # request's NaN in the pool would reach every query that reads a tile holding it (the gathering paths zero
    # masked slots instead).
    if meta.static is not None:
        _write_cache(kv, k.nan_to_num(), v.nan_to_num(), meta.slot_mapping)
        return _static_decode(q, kv, meta.static, scale, window)
    if meta.flex is not None and len(kv) == 2:  # an int8 cache takes the gathering path (it dequantises)
        _write_cache(kv, k.nan_to_num(), v.nan_to_num(), meta.slot_mapping)
        return flex.flex_paged_attention(q, kv[0], kv[1], meta.flex, scale, window)
    k_cache, v_cache, *scales = kv  # scales: an int8 cache's (key scales, value scales)
    block_size = k_cache.shape[1]
    ops = usable(q) if meta.kernel is not None and (k_cache.dtype == q.dtype or scales) else None
    if ops is not None:
        ops.write_kv(k, v, k_cache, v_cache, meta.slot_mapping, *scales)
    else:
        _write_cache(kv, k, v, meta.slot_mapping)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    done: tuple[int, ...] | set[int] = ()
    if ops is not None:
        kr = meta.kernel
        ops.paged_attention(q, k_cache, v_cache, kr.cu_q, kr.seqlens_k, meta.block_tables, kr.rows_t, scale,
                            window or 0, out, *scales)
        if len(kr.rows) == len(meta.seqlens_q):  # every sequence (a decode step): nothing left for SDPA
            return out
        done = set(kr.rows)
    elif (decode := meta.decode if window is None or max(meta.seqlens_k) <= window else None) is not None:
        keys = _read_cache(kv, 0, decode.block_tables, q.dtype).flatten(1, 2)  # [B, blocks * block_size, kvh, dim]
        values = _read_cache(kv, 1, decode.block_tables, q.dtype).flatten(1, 2)
        # Masked slots (a block's unused tail, padding) may hold a former owner's NaN: weighted 0, it is still NaN.
        stale = ~decode.key_mask[:, 0, 0, :, None, None]
        keys.masked_fill_(stale, 0)
        values.masked_fill_(stale, 0)
        out[decode.token_idx] = F.scaled_dot_product_attention(
            q[decode.token_idx][:, :, None], keys.transpose(1, 2), values.transpose(1, 2), attn_mask=decode.key_mask,
            scale=scale, enable_gqa=q.shape[1] != k.shape[1])[:, :, 0]
        done = set(decode.rows)
    if len(done) == len(meta.seqlens_q):
        return out
    starts = meta.cu_seqlens_q.tolist()
    for i, (lq, lk) in enumerate(zip(meta.seqlens_q, meta.seqlens_k, strict=True)):
        if i in done:
            continue
        s = starts[i]
        if lk == lq:  # nothing cached before these tokens: attend to the new keys and values directly
            ki, vi = k[s: s + lq], v[s: s + lq]
        else:
            blocks = meta.block_tables[i, : (lk + block_size - 1) // block_size]
            ki = _read_cache(kv, 0, blocks, q.dtype).flatten(0, 1)[:lk]
            vi = _read_cache(kv, 1, blocks, q.dtype).flatten(0, 1)[:lk]
        out[s: s + lq] = _sdpa(q[s: s + lq][None], ki[None].to(q.dtype), vi[None].to(q.dtype), scale, window)[0]
    return out


def _static_decode(q: torch.Tensor, kv: KVCache, step: StaticDecode, scale: float, window: int | None) -> torch.Tensor:
    """q [B, H, D] (one new token per sequence, its key already written) -> [B, H, D], over every block of the
    padded tables with the keys past each length (or before its window) masked: fixed shapes, no host reads."""
    keys = _read_cache(kv, 0, step.block_tables, q.dtype).flatten(1, 2)  # [B, max_blocks * block_size, kvh, dim]
    values = _read_cache(kv, 1, step.block_tables, q.dtype).flatten(1, 2)
    at = torch.arange(keys.shape[1], device=q.device)[None, :]
    lens = step.seqlens_k[:, None]
    allowed = at < lens
    if window is not None:
        allowed &= at >= lens - window
    stale = ~allowed[:, :, None, None]  # a masked slot may hold a former owner's NaN: weighted 0, it is still NaN
    keys, values = keys.masked_fill(stale, 0), values.masked_fill(stale, 0)
    out = F.scaled_dot_product_attention(q[:, :, None], keys.transpose(1, 2), values.transpose(1, 2),
                                         attn_mask=allowed[:, None, None, :], scale=scale,
                                         enable_gqa=q.shape[1] != keys.shape[2])
    return out[:, :, 0]
