"""Tensor parallelism for serving (vLLM's `tensor_parallel_size`): one model split over N processes, Megatron-style,
over torch.distributed (a gloo group; on one x86 machine the collectives of a step go through shared memory:
engine/shm_comm.py). This file splits the model; engine/tp_workers.py starts and drives the processes.

Each rank holds a share of every layer: its attention heads, grouped by KV head (q/k/v rows, o columns, its part of
the KV cache), its share of the MLP's intermediate features (gate/up rows, down columns) or of a mixture's experts
(whole experts; the router on every rank; a shared expert split like an MLP), and a slice of the vocabulary
(embedding rows; the LM head's rows, whose logits are gathered). Two all-reduces per layer — after the attention's
output product and after the MLP or experts — and one after the embedding lookup make every rank's hidden state the
full one; the bias of a row-parallel product is added by rank 0 only. KV heads that do not divide evenly are split as
evenly as they go (SmolLM2's 3 over 2 ranks: 2 and 1).

`shard_model` says, for every tensor of the full model, which part of it the rank holds (a `Share`): the checkpoint
loader reads only those parts from the safetensors files, and new weights (a trainer's `update_weights`) are cut the
same way for each rank.
"""

import dataclasses
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lmforge.engine.shm_comm import ShmComm
from lmforge.errors import LmforgeError
from lmforge.layers.linear import Linear


def share(n: int, rank: int, world: int) -> tuple[int, int]:
    """[lo, hi) of rank's share of n items split as evenly as they go (the first n % world ranks get one more)."""
    base, extra = divmod(n, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


# The group's shared-memory collectives (engine/shm_comm.py) where its ranks have them; else gloo's.
_comm: ShmComm | None = None


def all_reduce(x: torch.Tensor) -> None:
    _comm.all_reduce(x) if _comm is not None else dist.all_reduce(x)


def all_gather(parts: list[torch.Tensor], x: torch.Tensor) -> None:
    _comm.all_gather(parts, x) if _comm is not None else dist.all_gather(parts, x)


def comm_tensors() -> list[torch.Tensor]:
    """The shared-memory collectives' own tensors (a step graph recording their kernel reads them), or none."""
    return _comm.tensors() if _comm is not None else []


@dataclass(frozen=True)
class Share:
    """The part of a full tensor (of shape `full`) one rank holds: `spans` [lo, hi) along `dim`, concatenated (None:
    all of it), zero-padded along dim 0 to `rows` (the vocabulary's equal slices)."""

    full: tuple[int, ...]
    dim: int = 0
    spans: tuple[tuple[int, int], ...] | None = None
    rows: int | None = None

    def take(self, full) -> torch.Tensor:
        """This share of `full`: a tensor, or a safetensors slice (then only these spans are read from the file)."""
        if self.spans is None:
            part = full[...]
        else:
            parts = [full[lo:hi] if self.dim == 0 else full[:, lo:hi] for lo, hi in self.spans]
            part = parts[0] if len(parts) == 1 else torch.cat(parts, self.dim)
        if self.rows is not None and part.shape[0] < self.rows:
            part = torch.cat([part, part.new_zeros(self.rows - part.shape[0], *part.shape[1:])])
        return part


class RowParallel(nn.Module):
    """A product whose input features are split over the ranks: each computes a partial sum, the all-reduce adds
    them. Only rank 0's inner layer keeps the bias."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.takes_lora = not hasattr(inner, "experts")  # a mixture's block takes none (its experts get no LoRA)

    def forward(self, x: torch.Tensor, lora=None) -> torch.Tensor:
        y = self.inner(x, lora) if self.takes_lora else self.inner(x)
        all_reduce(y)
        return y


class Elsewhere(nn.Module):
    """An expert another rank holds: it adds nothing here (its share comes in through the all-reduce)."""

    def forward(self, x: torch.Tensor, lora=None) -> torch.Tensor:
        return torch.zeros_like(x)


class VocabParallelEmbedding(nn.Module):
    """This rank's rows [lo, hi) of the embedding table (padded to an equal share); tokens outside them look up
    zeros and the all-reduce fills them in from the rank that holds them."""

    def __init__(self, weight: nn.Parameter, lo: int, hi: int):
        super().__init__()
        self.weight, self.lo, self.hi = weight, lo, hi

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        inside = (ids >= self.lo) & (ids < self.hi)
        x = F.embedding((ids - self.lo).clamp(0, self.weight.shape[0] - 1), self.weight)
        x = x * inside.unsqueeze(-1).to(x.dtype)
        all_reduce(x)
        return x


class GatheredHead(nn.Module):
    """The LM head over this rank's vocabulary slice; the slices' logits are gathered into the full row."""

    def __init__(self, inner: Linear, vocab_size: int, world: int):
        super().__init__()
        self.inner, self.vocab_size, self.world = inner, vocab_size, world

    def forward(self, x: torch.Tensor, lora=None) -> torch.Tensor:
        local = self.inner(x).contiguous()
        parts = [torch.empty_like(local) for _ in range(self.world)]
        all_gather(parts, local)
        return torch.cat(parts, dim=-1)[..., : self.vocab_size]


# ---- splitting a model -----------------------------------------------------------------------------------------
# the full model's tensor names -> (the name in a rank's share, its Share), or None: the rank holds none of it
Shares = dict[str, tuple[str, Share] | None]


class _Cutter:
    """Replaces parameters by this rank's shares and remembers, by the full model's names, what each one took."""

    def __init__(self):
        self.cuts: dict[str, tuple[nn.Parameter, Share] | None] = {}

    def cut(self, module: nn.Module, name: str, attr: str, spans=None, dim: int = 0, rows: int | None = None) -> None:
        p = getattr(module, attr)
        s = Share(tuple(p.shape), dim, tuple(spans) if spans is not None else None, rows)
        new = nn.Parameter(s.take(p.detach()).contiguous(), requires_grad=False)
        setattr(module, attr, new)
        self.cuts[f"{name}.{attr}"] = (new, s)

    def rows(self, layer: nn.Module, name: str, spans) -> None:
        layer = _plain(layer, name)
        self.cut(layer, name, "weight", spans)
        if layer.bias is not None:
            self.cut(layer, name, "bias", spans)
        layer.out_features = layer.weight.shape[0]

    def columns(self, layer: nn.Module, name: str, lo: int, hi: int, keep_bias: bool) -> None:
        layer = _plain(layer, name)
        self.cut(layer, name, "weight", [(lo, hi)], dim=1)
        if layer.bias is not None and not keep_bias:
            layer.bias = None
            self.cuts[f"{name}.bias"] = None
        layer.in_features = hi - lo


def _plain(layer: nn.Module, where: str) -> Linear:
    if type(layer) is not Linear:
        raise LmforgeError(f"tensor parallelism: {where} is a {type(layer).__name__}; only float linear layers are "
                           "split (quantization int8 / int4 quantises each rank's share after the split)")
    return layer


def _shard_attention(attn: nn.Module, rank: int, world: int, name: str, c: _Cutter) -> None:
    heads, kv_heads, dim = attn.heads, attn.kv_heads, attn.head_dim
    if kv_heads < world:
        raise LmforgeError(f"tensor_parallel_size={world} exceeds the model's {kv_heads} KV heads: every rank "
                           "needs at least one")
    group = heads // kv_heads
    kv_lo, kv_hi = share(kv_heads, rank, world)
    q_lo, q_hi = kv_lo * group, kv_hi * group
    q, kv = (q_lo * dim, q_hi * dim), (kv_lo * dim, kv_hi * dim)
    if hasattr(attn, "qkv_proj"):  # Phi-3: q, k and v rows in one product
        k_at, v_at = heads * dim, (heads + kv_heads) * dim
        c.rows(attn.qkv_proj, f"{name}.qkv_proj", [q, (k_at + kv[0], k_at + kv[1]), (v_at + kv[0], v_at + kv[1])])
    else:
        c.rows(attn.q_proj, f"{name}.q_proj", [q])
        for proj in ("k_proj", "v_proj"):
            c.rows(getattr(attn, proj), f"{name}.{proj}", [kv])
    c.columns(attn.o_proj, f"{name}.o_proj", *q, keep_bias=rank == 0)
    attn.o_proj = RowParallel(attn.o_proj)
    attn.heads, attn.kv_heads = q_hi - q_lo, kv_hi - kv_lo


def _split_mlp(mlp: nn.Module, rank: int, world: int, name: str, c: _Cutter) -> None:
    n = _plain(mlp.down_proj, f"{name}.down_proj").in_features
    lo, hi = share(n, rank, world)
    if hasattr(mlp, "gate_up_proj"):  # Phi-3: gate rows, then up rows
        c.rows(mlp.gate_up_proj, f"{name}.gate_up_proj", [(lo, hi), (n + lo, n + hi)])
    else:
        for proj in ("gate_proj", "up_proj"):
            c.rows(getattr(mlp, proj), f"{name}.{proj}", [(lo, hi)])
    c.columns(mlp.down_proj, f"{name}.down_proj", lo, hi, keep_bias=rank == 0)


def _shard_experts(moe: nn.Module, rank: int, world: int, name: str, c: _Cutter) -> nn.Module:
    """A mixture of experts split by expert (each rank keeps its share of the experts, the router is everyone's) and
    its shared expert, if any, by intermediate features; one all-reduce after the whole block."""
    lo, hi = share(len(moe.experts), rank, world)
    for i in range(len(moe.experts)):
        if not lo <= i < hi:
            moe.experts[i] = Elsewhere()
    if getattr(moe, "has_shared", False):  # Qwen2-MoE: sigmoid(gate(x)) * shared(x) is linear in shared's partials
        _split_mlp(moe.shared_expert, rank, world, f"{name}.shared_expert", c)
    return RowParallel(moe)


def _shard_vocab(model: nn.Module, rank: int, world: int, c: _Cutter) -> None:
    decoder, vocab = model.model, model.args.vocab_size
    chunk = -(-vocab // world)
    lo, hi = rank * chunk, min(vocab, (rank + 1) * chunk)
    tied = model.lm_head.weight is decoder.embed_tokens.weight
    head = _plain(model.lm_head, "lm_head")
    if head.bias is not None:
        raise LmforgeError("tensor parallelism: an LM head with a bias is not split yet")
    c.cut(decoder.embed_tokens, "model.embed_tokens", "weight", [(lo, hi)], rows=chunk)
    decoder.embed_tokens = VocabParallelEmbedding(decoder.embed_tokens.weight, lo, hi)
    if tied:
        head.weight = decoder.embed_tokens.weight
    else:
        c.cut(head, "lm_head", "weight", [(lo, hi)], rows=chunk)
    head.out_features = chunk
    model.lm_head = GatheredHead(head, vocab, world)


def shard_model(model: nn.Module, rank: int, world: int) -> Shares:
    """Keeps rank's share of every layer of a model (in place; on the meta device too, before anything is
    allocated), puts the collectives in, and returns what the rank holds of each of the full model's tensors (tied
    names included). model.args then describes this rank's attention (its heads and KV heads: what its KV cache
    holds)."""
    full = list(model.named_parameters(remove_duplicate=False))
    c = _Cutter()
    for i, layer in enumerate(model.model.layers):
        _shard_attention(layer.self_attn, rank, world, f"model.layers.{i}.self_attn", c)
        attr = "block_sparse_moe" if hasattr(layer, "block_sparse_moe") else "mlp"  # Mixtral's name, everyone else's
        mlp, name = getattr(layer, attr), f"model.layers.{i}.{attr}"
        if hasattr(mlp, "experts"):
            setattr(layer, attr, _shard_experts(mlp, rank, world, name, c))
        elif hasattr(mlp, "down_proj"):
            _split_mlp(mlp, rank, world, name, c)
            mlp.down_proj = RowParallel(mlp.down_proj)
        else:
            raise LmforgeError(f"tensor parallelism: {name} is a {type(mlp).__name__}, which is not split yet")
    _shard_vocab(model, rank, world, c)
    a = model.model.layers[0].self_attn
    model.args = dataclasses.replace(model.args, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads)
    held = {id(p): n for n, p in model.named_parameters()}
    by_id = {id(p): n for n, p in full[::-1]}  # a tied tensor's first name
    shares: Shares = {}
    for name, p in full:
        cut = c.cuts.get(by_id[id(p)], (p, Share(tuple(p.shape))))
        shares[name] = (held[id(cut[0])], cut[1]) if cut is not None and id(cut[0]) in held else None
    return shares


@dataclass(frozen=True)
class LoraCut:
    """What a rank keeps of a served LoRA adapter's A [r, in] and B [out, r] for a layer whose weight it holds
    `weight` of: a row-parallel layer's A columns (its partial products are summed by the layer's all-reduce), a
    column-parallel layer's B rows; `full` is the whole layer's shape, which adapters are checked against."""

    weight: Share

    @property
    def full(self) -> SimpleNamespace:
        return SimpleNamespace(out_features=self.weight.full[0], in_features=self.weight.full[1])

    def a(self, a: torch.Tensor) -> torch.Tensor:
        split = self.weight.dim == 1 and self.weight.spans is not None
        return Share(tuple(a.shape), 1, self.weight.spans).take(a) if split else a

    def b(self, b: torch.Tensor) -> torch.Tensor:
        split = self.weight.dim == 0 and self.weight.spans is not None
        return Share(tuple(b.shape), 0, self.weight.spans, self.weight.rows).take(b) if split else b


def lora_cuts(shares: Shares, paths) -> dict[str, LoraCut]:
    """The LoraCut of each servable layer (by the module path PEFT's keys name) from the rank's shares."""
    return {path: LoraCut(shares[f"{path}.weight"][1]) for path in paths}
