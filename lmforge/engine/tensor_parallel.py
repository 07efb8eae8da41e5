"""Tensor parallelism for serving (vLLM's `tensor_parallel_size`): one model split over N processes on this machine,
Megatron-style, over torch.distributed (a gloo group; the collectives of a step through shared memory on x86:
engine/shm_comm.py).

Each rank holds a share of every layer: its attention heads, grouped by KV head (q/k/v rows, o columns, its part of
the KV cache), its share of the MLP's intermediate features (gate/up rows, down columns) or of a mixture's experts
(whole experts; the router on every rank; a shared expert split like an MLP), and a slice of the vocabulary
(embedding rows; the LM head's rows, whose logits are gathered). Two all-reduces per layer — after the attention's
output product and after the MLP or experts — and one after the embedding lookup make every rank's hidden state the
full one; the bias of a row-parallel product is added by rank 0 only.

Rank 0 is the process that built the engine: its scheduler plans each step and broadcasts the plan (token ids,
positions, cache slots and block tables: `StepPlan`), then every rank runs the same forward. Ranks 1..N-1 are
processes lmforge starts itself (`Workers.start`), each loading the model and keeping only its share (the whole
checkpoint is read and then sliced: shard-by-shard reading is not built). KV heads that do not divide evenly are
split as evenly as they go (SmolLM2's 3 over 2 ranks: 2 and 1).

Not built: step graphs under TP (steps run the kernels eagerly), LoRA, speculative decoding, prompt log-probs,
quantised weights, the live-model path, joining a torchrun launch across machines. The engine refuses each with a
message. (Data-parallel replicas: engine/data_parallel.py.)
"""

import contextlib
import dataclasses
import datetime
import logging
import os
import socket
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from lmforge.engine import shm_comm
from lmforge.engine.shm_comm import ShmComm
from lmforge.errors import LmforgeError
from lmforge.layers.linear import Linear

log = logging.getLogger("lmforge")
TIMEOUT = datetime.timedelta(seconds=120)  # a collective waiting longer than this means a rank is gone


def share(n: int, rank: int, world: int) -> tuple[int, int]:
    """[lo, hi) of rank's share of n items split as evenly as they go (the first n % world ranks get one more)."""
    base, extra = divmod(n, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


# The group's shared-memory collectives (engine/shm_comm.py) where this machine has them; else gloo's.
_comm: ShmComm | None = None


def all_reduce(x: torch.Tensor) -> None:
    _comm.all_reduce(x) if _comm is not None else dist.all_reduce(x)


def all_gather(parts: list[torch.Tensor], x: torch.Tensor) -> None:
    _comm.all_gather(parts, x) if _comm is not None else dist.all_gather(parts, x)


class RowParallel(nn.Module):
    """A product whose input features are split over the ranks: each computes a partial sum, the all-reduce adds
    them. Only rank 0's inner layer keeps the bias."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor, lora=None) -> torch.Tensor:
        y = self.inner(x) if lora is None else self.inner(x, lora)  # Mixtral's experts block takes no lora
        all_reduce(y)
        return y


class Elsewhere(nn.Module):
    """An expert another rank holds: it adds nothing here (its share comes in through the all-reduce)."""

    def forward(self, x: torch.Tensor, lora=None) -> torch.Tensor:
        return torch.zeros_like(x)


class VocabParallelEmbedding(nn.Module):
    """This rank's rows [lo, lo + rows) of the embedding table (padded to an equal share); tokens outside them look
    up zeros and the all-reduce fills them in from the rank that holds them."""

    def __init__(self, weight: torch.Tensor, lo: int, hi: int):
        super().__init__()
        self.weight, self.lo, self.hi = nn.Parameter(weight, requires_grad=False), lo, hi

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


def _rows(layer: Linear, index: torch.Tensor) -> None:
    layer.weight = nn.Parameter(layer.weight.detach()[index].contiguous(), requires_grad=False)
    if layer.bias is not None:
        layer.bias = nn.Parameter(layer.bias.detach()[index].contiguous(), requires_grad=False)
    layer.out_features = len(index)


def _columns(layer: Linear, lo: int, hi: int, keep_bias: bool) -> None:
    layer.weight = nn.Parameter(layer.weight.detach()[:, lo:hi].contiguous(), requires_grad=False)
    if layer.bias is not None and not keep_bias:
        layer.bias = None
    layer.in_features = hi - lo


def _plain(layer: nn.Module, where: str) -> Linear:
    if type(layer) is not Linear:
        raise LmforgeError(f"tensor parallelism: {where} is a {type(layer).__name__}; only plain (float) linear "
                           "layers are split (quantised weights and LoRA are not supported with "
                           "tensor_parallel_size > 1)")
    return layer


def _shard_attention(attn: nn.Module, rank: int, world: int, name: str) -> None:
    heads, kv_heads, dim = attn.heads, attn.kv_heads, attn.head_dim
    if kv_heads < world:
        raise LmforgeError(f"tensor_parallel_size={world} exceeds the model's {kv_heads} KV heads: every rank "
                           "needs at least one")
    group = heads // kv_heads
    kv_lo, kv_hi = share(kv_heads, rank, world)
    q_lo, q_hi = kv_lo * group, kv_hi * group
    q_rows = torch.arange(q_lo * dim, q_hi * dim)
    kv_rows = torch.arange(kv_lo * dim, kv_hi * dim)
    if hasattr(attn, "qkv_proj"):  # Phi-3: q, k and v rows in one product
        qkv = _plain(attn.qkv_proj, f"{name}.qkv_proj")
        _rows(qkv, torch.cat([q_rows, heads * dim + kv_rows, (heads + kv_heads) * dim + kv_rows]))
    else:
        _rows(_plain(attn.q_proj, f"{name}.q_proj"), q_rows)
        for proj in ("k_proj", "v_proj"):
            _rows(_plain(getattr(attn, proj), f"{name}.{proj}"), kv_rows)
    o = _plain(attn.o_proj, f"{name}.o_proj")
    _columns(o, q_lo * dim, q_hi * dim, keep_bias=rank == 0)
    attn.o_proj = RowParallel(o)
    attn.heads, attn.kv_heads = q_hi - q_lo, kv_hi - kv_lo


def _shard_mlp(mlp: nn.Module, rank: int, world: int, name: str) -> nn.Module:
    """A dense MLP's share, behind its all-reduce."""
    _split_mlp(mlp, rank, world, name)
    mlp.down_proj = RowParallel(mlp.down_proj)
    return mlp


def _shard_experts(moe: nn.Module, rank: int, world: int, name: str) -> nn.Module:
    """A mixture of experts split by expert (each rank keeps its share of the experts, the router is everyone's) and
    its shared expert, if any, by intermediate features; one all-reduce after the whole block."""
    lo, hi = share(len(moe.experts), rank, world)
    for i in range(len(moe.experts)):
        if not lo <= i < hi:
            moe.experts[i] = Elsewhere()
    if getattr(moe, "has_shared", False):  # Qwen2-MoE: sigmoid(gate(x)) * shared(x) is linear in shared's partials
        _split_mlp(moe.shared_expert, rank, world, f"{name}.shared_expert")
    return RowParallel(moe)


def _split_mlp(mlp: nn.Module, rank: int, world: int, name: str) -> None:
    down = _plain(mlp.down_proj, f"{name}.down_proj")
    lo, hi = share(down.in_features, rank, world)
    if hasattr(mlp, "gate_up_proj"):  # Phi-3: gate rows, then up rows
        n = down.in_features
        _rows(_plain(mlp.gate_up_proj, f"{name}.gate_up_proj"), torch.cat([torch.arange(lo, hi),
                                                                            torch.arange(n + lo, n + hi)]))
    else:
        for proj in ("gate_proj", "up_proj"):
            _rows(_plain(getattr(mlp, proj), f"{name}.{proj}"), torch.arange(lo, hi))
    _columns(down, lo, hi, keep_bias=rank == 0)


def shard_model(model: nn.Module, rank: int, world: int) -> None:
    """Keeps rank's share of every layer of a loaded model (in place) and puts the collectives in; model.args then
    describes this rank's attention (its heads and KV heads: what its KV cache holds)."""
    decoder = model.model
    for i, layer in enumerate(decoder.layers):
        _shard_attention(layer.self_attn, rank, world, f"model.layers.{i}.self_attn")
        attr = "block_sparse_moe" if hasattr(layer, "block_sparse_moe") else "mlp"  # Mixtral's name, everyone else's
        mlp, name = getattr(layer, attr), f"model.layers.{i}.{attr}"
        if hasattr(mlp, "experts"):
            setattr(layer, attr, _shard_experts(mlp, rank, world, name))
        elif hasattr(mlp, "down_proj"):
            _shard_mlp(mlp, rank, world, name)
        else:
            raise LmforgeError(f"tensor parallelism: {name} is a {type(mlp).__name__}, which is not split yet")
    vocab = model.args.vocab_size
    chunk = -(-vocab // world)
    lo, hi = rank * chunk, min(vocab, (rank + 1) * chunk)
    table = decoder.embed_tokens.weight.detach()
    padded = table.new_zeros(chunk, table.shape[1])
    padded[: hi - lo] = table[lo:hi]
    tied = model.lm_head.weight is decoder.embed_tokens.weight
    decoder.embed_tokens = VocabParallelEmbedding(padded, lo, hi)
    head = _plain(model.lm_head, "lm_head")
    if tied:
        head.weight = decoder.embed_tokens.weight
    else:
        rows = head.weight.detach().new_zeros(chunk, head.in_features)
        rows[: hi - lo] = head.weight.detach()[lo:hi]
        head.weight = nn.Parameter(rows, requires_grad=False)
    if head.bias is not None:
        raise LmforgeError("tensor parallelism: an LM head with a bias is not split yet")
    head.out_features = chunk
    model.lm_head = GatheredHead(head, vocab, world)
    a = decoder.layers[0].self_attn
    model.args = dataclasses.replace(model.args, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads)


# ---- processes -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepPlan:
    """What every rank needs to run a step as rank 0's scheduler planned it (ModelRunner.plan)."""

    ids: list[int]
    positions: list[int]
    slots: list[int]
    seqlens_q: list[int]
    seqlens_k: list[int]
    tables: list[list[int]]
    logits_idx: list[int]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_group(rank: int, world: int, port: int, shm: str | None, alive) -> None:
    """Joins the gloo group and, with a shared-memory segment's name, its shared-memory collectives."""
    global _comm
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=TIMEOUT)
    _comm = ShmComm(shm, rank, world, alive) if shm is not None else None


def leave_group() -> None:
    global _comm
    if _comm is not None:
        _comm.close()
        _comm = None
    dist.destroy_process_group()


def holdings(model: nn.Module, runner) -> dict[str, int]:
    """What this rank holds: its weights' bytes and its KV pool's."""
    from lmforge.weights.quantized import weight_bytes

    return {"weights": weight_bytes(model),
            "kv": sum(t.numel() * t.element_size() for layer in runner.kv for t in layer)}


class WorkerDied(RuntimeError):
    """A tensor-parallel rank's process is gone: the engine cannot step any more."""


class Workers:
    """Ranks 1..world-1, started by `Workers.start` (each loads the model and waits for commands); this process
    joins the group as rank 0 and sends each command with `broadcast`."""

    def __init__(self, procs: list, shm):
        self.procs, self.shm = procs, shm

    @classmethod
    def start(cls, config, world: int) -> "Workers":
        if dist.is_initialized():
            raise LmforgeError("tensor_parallel_size > 1 starts its own process group, and this process already has "
                               "one (joining a torchrun launch is not supported yet)")
        port = free_port()
        ctx = mp.get_context("spawn")
        threads = torch.get_num_threads()
        shm = shm_comm.create(world) if shm_comm.usable() else None
        name = shm.name if shm is not None else None
        procs = [ctx.Process(target=_worker, args=(config, rank, world, port, name, threads), daemon=True,
                             name=f"lmforge-tp-rank{rank}") for rank in range(1, world)]
        for p in procs:
            p.start()
        workers = cls(procs, shm)
        with workers.watch():
            init_group(0, world, port, name, lambda: not workers.dead())
        return workers

    def dead(self) -> list[str]:
        return [f"rank {rank} (exit code {p.exitcode})" for rank, p in enumerate(self.procs, 1)
                if not p.is_alive()]

    @contextlib.contextmanager
    def watch(self):
        """Turns a failed collective into an error that names the ranks whose processes are gone."""
        try:
            yield
        except RuntimeError as e:
            time.sleep(0.2)  # a process that closed its sockets is about to be reaped
            if dead := self.dead():
                raise WorkerDied(f"tensor parallel worker {', '.join(dead)} died; the engine cannot continue "
                                 f"({str(e).splitlines()[0][:200]})") from e
            raise

    def broadcast(self, kind: str, payload=None) -> None:
        with self.watch():
            dist.broadcast_object_list([(kind, payload)], src=0)

    def holdings(self, model: nn.Module, runner) -> list[dict[str, int]]:
        """Every rank's weight and KV-pool bytes (rank 0's from `model` and `runner`), in rank order."""
        self.broadcast("report")
        out = [None] * (len(self.procs) + 1)
        with self.watch():
            dist.gather_object(holdings(model, runner), out, dst=0)
        return out

    def stop(self, timeout: float = 10.0) -> None:
        """Tells the workers to stop and waits for them; kills those still running after `timeout` seconds."""
        if dist.is_initialized():
            try:
                if not self.dead():
                    self.broadcast("stop")
            except Exception as e:  # a worker gone meanwhile: nothing left to tell
                log.warning("tensor parallel shutdown: %s", e)
            finally:
                leave_group()
        for p in self.procs:
            p.join(timeout)
            if p.is_alive():
                p.kill()
        if self.shm is not None:
            self.shm.close()
            self.shm.unlink()
            self.shm = None


def load_shard(config, rank: int, world: int) -> nn.Module:
    from lmforge.hardware import compute_dtype
    from lmforge.weights.quantized import load_for_serving
    from lmforge.weights.resolve import resolve_model

    model, _ = load_for_serving(config.model, resolve_model(config.model), config.quantization,
                                compute_dtype(config.dtype, config.device), config.device)
    shard_model(model, rank, world)
    return model


def _worker(config, rank: int, world: int, port: int, shm: str | None, threads: int) -> None:
    """Rank > 0: loads its share, builds its runner when rank 0 says how, then runs every step rank 0 broadcasts
    until told to stop (or until rank 0 is gone: the collective fails and the process exits non-zero)."""
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING, format=f"lmforge rank {rank}: %(message)s")  # rank 0 logs the rest
    parent = os.getppid()
    init_group(rank, world, port, shm, lambda: os.getppid() == parent)
    model = load_shard(config, rank, world)
    runner = None
    with torch.inference_mode():
        while True:
            command = [None]
            dist.broadcast_object_list(command, src=0)
            kind, payload = command[0]
            if kind == "runner":
                from lmforge.engine.model_runner import ModelRunner

                runner = ModelRunner(model, **payload)
            elif kind == "warm_up":
                runner.warm_up()
            elif kind == "step":
                runner.run_plan(payload)
            elif kind == "report":
                dist.gather_object(holdings(model, runner), None, dst=0)
            elif kind == "stop":
                break
    leave_group()
