"""The processes of tensor parallelism (engine/tensor_parallel.py splits the model). Rank 0 is the process that
builds the engine: its scheduler plans each step and broadcasts the plan (token ids, positions, cache slots, block
tables: `StepPlan`), then every rank runs the same forward. The other ranks are either processes lmforge starts
itself on this machine (`Workers.start`) or the other processes of a torchrun / SLURM launch, on one machine or
several (`Workers.join`: every process runs the same command; ranks > 0 serve rank 0 and exit when it stops).

Each rank builds its share of the model on the meta device and allocates only that: from a checkpoint it reads only
its slices of the safetensors files; for a live model (a trainer's) rank 0 sends each rank its slices of the weights
(`Workers.set_weights`), at start and at every `update_weights`. Collectives go through shared memory when every rank is
on this machine (x86), through gloo otherwise.
"""

import contextlib
import datetime
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lmforge.engine import shm_comm, tensor_parallel
from lmforge.engine.shm_comm import ShmComm
from lmforge.engine.tensor_parallel import Shares, shard_model
from lmforge.errors import LmforgeError
from lmforge.models import allocate, build_on_meta
from lmforge.world import World, world_from_env

log = logging.getLogger("lmforge")
TIMEOUT = datetime.timedelta(seconds=120)  # a collective waiting longer than this means a rank is gone


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
    prompt_rows: list[int]  # rows whose logits score prompt tokens (prompt_logprobs), before logits_idx's
    lora_slots: tuple[int, ...] = ()  # each sequence's LoRA slot (multi-LoRA serving); () when none uses one


@dataclass(frozen=True)
class LiveSource:
    """A live model's architecture (its config.json dict) and dtype: ranks build empty shares, rank 0 pushes the
    weights."""

    cfg: dict
    dtype: torch.dtype


class WorkerDied(RuntimeError):
    """A tensor-parallel rank's process is gone: the engine cannot step any more."""


# ---- a rank's share ------------------------------------------------------------------------------------------------
def empty_shard(cfg: dict, where: str, dtype: torch.dtype, rank: int, world: int) -> tuple[nn.Module, Shares]:
    """Rank's share of the model `cfg` describes, allocated (uninitialised) on the CPU, and what it holds of each
    tensor."""
    model, args = build_on_meta(cfg, where, dtype)
    shares = shard_model(model, rank, world)
    model = allocate(model, "cpu")
    if args.tie_word_embeddings:  # allocate() gives shared parameters separate storage
        model.lm_head.inner.weight = model.model.embed_tokens.weight
    model.config, model.tp_shares = cfg, shares
    return model.eval(), shares


def check_splittable(spec, model_dir: Path, quantization: str | None = None) -> dict:
    """The config.json of a checkpoint tensor parallelism can split (float weights, quantised after the split or
    not), else a clear error."""
    from lmforge.models.config import read_config
    from lmforge.weights.quantized import CONFIG_KEY

    if str(spec).endswith(".gguf") or quantization == "gguf":
        raise LmforgeError(f"tensor parallelism splits float weights; {spec} as GGUF blocks is served by the GGUF "
                           "kernels in one process (convert it to a model directory first: lmforge convert, then "
                           "quantization int8 or int4 quantises each rank's share)")
    cfg = read_config(model_dir)
    if CONFIG_KEY in cfg:
        raise LmforgeError(f"{model_dir} holds quantised weights; tensor parallelism splits float weights only")
    return cfg


def load_shard(config, rank: int, world: int) -> tuple[nn.Module, Shares]:
    """Rank's share of the checkpoint config.model, reading only its slices of the weight files."""
    from lmforge.hardware import compute_dtype
    from lmforge.models import resolve_dtype
    from lmforge.weights.hf_dir import load_weights
    from lmforge.weights.resolve import resolve_model

    model_dir = Path(resolve_model(config.model))
    cfg = check_splittable(config.model, model_dir, config.quantization)
    dtype = resolve_dtype(compute_dtype(config.dtype, config.device), cfg, "cpu")
    model, shares = empty_shard(cfg, str(model_dir / "config.json"), dtype, rank, world)
    t0 = time.perf_counter()
    read = load_weights(model, model_dir, progress=rank == 0, shares=shares)
    log.info("rank %d read its %.0f MiB of the checkpoint in %.1fs", rank, read / 2**20, time.perf_counter() - t0)
    if config.quantization is not None:  # each rank quantises its own share (blocks along its input features)
        from lmforge.weights.quantized import quantize_model

        quantize_model(model, config.quantization)
    model.bytes_read = read
    return model, shares


def holdings(model: nn.Module, runner) -> dict[str, int]:
    """What this rank holds: its weights' bytes, its KV pool's, and what it read of the checkpoint."""
    from lmforge.weights.quantized import weight_bytes

    return {"weights": weight_bytes(model), "read": getattr(model, "bytes_read", 0),
            "kv": sum(t.numel() * t.element_size() for layer in runner.kv for t in layer) if runner else 0}


# ---- the group -----------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_group(rank: int, world: int, init_method: str, shm: str | None, alive, watch: list[int]) -> None:
    """Joins the gloo group and, with a shared-memory segment's name, its shared-memory collectives (alive / watch:
    how a wait there notices a gone process, ShmComm)."""
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world, timeout=TIMEOUT)
    tensor_parallel._comm = ShmComm(shm, rank, world, alive, watch) if shm is not None else None


def leave_group() -> None:
    if tensor_parallel._comm is not None:
        tensor_parallel._comm.close()
        tensor_parallel._comm = None
    dist.destroy_process_group()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def launched() -> World | None:
    """This process's place in a torchrun / SLURM launch of several processes, else None."""
    world = world_from_env()
    return world if world.distributed else None


def serve_if_launched_worker(config) -> None:
    """In a torchrun / SLURM launch with tensor_parallel_size > 1, ranks > 0 serve rank 0 here and exit the process
    when it stops (whatever command the launch runs); rank 0, and a process outside a launch, return at once."""
    launch = launched()
    if config.tensor_parallel_size > 1 and launch is not None and launch.rank > 0:
        Workers.join(config, launch)


class Workers:
    """Ranks 1..world-1 as rank 0 sees them: `start` starts them (processes of this machine), `join` joins those of a
    launch; `broadcast` sends each command, `set_weights` new weights."""

    def __init__(self, world: int, procs: list | None = None, pids: list[int] | None = None, shm=None):
        """procs: the processes this one started; pids: a launch's ranks' process ids (None: on other machines)."""
        self.world, self.procs, self.pids, self.shm = world, procs or [], pids, shm
        self.shares: list[Shares] | None = None  # every rank's, made when weights are first set

    @classmethod
    def start(cls, source, world: int) -> "Workers":
        """source: an EngineConfig (each rank loads its slices of config.model) or a LiveSource."""
        if dist.is_initialized():
            raise LmforgeError("tensor_parallel_size > 1 starts its own process group, and this process already has "
                               "one (a live model under torchrun cannot be split)")
        port = free_port()
        ctx = mp.get_context("spawn")
        threads = torch.get_num_threads()
        shm = shm_comm.create(world) if shm_comm.usable() else None
        name = shm.name if shm is not None else None
        ready = [ctx.Event() for _ in range(1, world)]
        procs = [ctx.Process(target=_worker, args=(source, rank, world, f"tcp://127.0.0.1:{port}", name, threads,
                                                   ready[rank - 1]),
                             daemon=True, name=f"lmforge-tp-rank{rank}") for rank in range(1, world)]
        for p in procs:
            p.start()
        workers = cls(world, procs=procs, shm=shm)
        # A worker that dies before it joins (an import error, no memory) would leave gloo waiting out its 120 s:
        # each says it is about to join, and this process watches them until all have.
        while not all(event.wait(0.05) for event in ready):
            if dead := workers.dead():
                workers.stop()
                raise WorkerDied(f"tensor parallel worker {', '.join(dead)} died while starting; see its message "
                                 "above")
        with workers.watch():
            init_group(0, world, f"tcp://127.0.0.1:{port}", name, lambda: not workers.dead(), [p.pid for p in procs])
        return workers

    @classmethod
    def join(cls, config, launch: World) -> "Workers":
        """Joins the launch this process belongs to (torchrun's or SLURM's environment: MASTER_ADDR, MASTER_PORT).
        Rank 0 returns its Workers; every other rank loads its share, serves rank 0's commands and exits the process
        (status 0) when rank 0 stops."""
        if launch.size != config.tensor_parallel_size:
            raise LmforgeError(f"the launch started {launch.size} processes but tensor_parallel_size is "
                               f"{config.tensor_parallel_size}; start exactly one process per rank")
        if not dist.is_initialized():
            dist.init_process_group("gloo", init_method="env://", rank=launch.rank, world_size=launch.size,
                                    timeout=TIMEOUT)
        one_machine = launch.local_size == launch.size
        pids = [None] * launch.size
        dist.all_gather_object(pids, os.getpid())
        shm = shm_comm.create(launch.size) if launch.rank == 0 and one_machine and shm_comm.usable() else None
        name = [shm.name if shm is not None else None]
        dist.broadcast_object_list(name, src=0)
        workers = cls(launch.size, pids=pids[1:] if one_machine else None, shm=shm)
        alive = (lambda: not workers.dead()) if launch.rank == 0 else (lambda: pid_alive(pids[0]))
        watch = pids[1:] if launch.rank == 0 else pids[:1]
        tensor_parallel._comm = ShmComm(name[0], launch.rank, launch.size, alive, watch) if name[0] else None
        if launch.rank == 0:
            log.info("joined a launch of %d ranks%s", launch.size, "" if one_machine else " on several machines")
            return workers
        logging.basicConfig(level=logging.WARNING, format=f"lmforge rank {launch.rank}: %(message)s", force=True)
        _serve(*load_shard(config, launch.rank, launch.size))
        raise SystemExit(0)

    @property
    def graphable(self) -> bool:
        """Whether step graphs can hold this group's collectives: shared memory, through the CPU kernels."""
        from lmforge import kernels

        return self.shm is not None and kernels.cpu_ops() is not None

    def dead(self) -> list[str]:
        gone = [f"rank {rank} (exit code {p.exitcode})" for rank, p in enumerate(self.procs, 1) if not p.is_alive()]
        return gone + [f"rank {rank} (pid {pid})" for rank, pid in enumerate(self.pids or [], 1) if not pid_alive(pid)]

    @contextlib.contextmanager
    def watch(self):
        """Turns a failed collective into an error that names the ranks whose processes are gone."""
        try:
            yield
        except RuntimeError as e:
            time.sleep(0.2)  # a process that closed its sockets is about to be reaped
            dead = self.dead()
            if dead or self.pids is None and not self.procs:  # another machine's rank: only the error says
                who = ", ".join(dead) if dead else "on another machine"
                raise WorkerDied(f"tensor parallel worker {who} died; the engine cannot continue "
                                 f"({str(e).splitlines()[0][:200]})") from e
            raise

    def broadcast(self, kind: str, payload=None) -> None:
        with self.watch():
            dist.broadcast_object_list([(kind, payload)], src=0)

    def set_weights(self, model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
        """Copies rank 0's slices of `weights` (the full model's tensor names, any subset) into `model`, its share,
        and sends every other rank its slices."""
        if self.shares is None:  # what every rank holds: their shares cut on the meta device
            self.shares = [shard_model(build_on_meta(model.config, "the model's config", torch.float32)[0], rank,
                                       self.world) for rank in range(self.world)]
        unknown = [name for name in weights if name not in self.shares[0]]
        if unknown:
            raise KeyError(f"update_weights: the model has no tensor {unknown[0]!r} ({len(unknown)} unknown names; "
                           "LoRA layers are not split over tensor-parallel ranks)")
        for name, value in weights.items():  # checked before any rank takes a slice
            full = next(held[1].full for shares in self.shares if (held := shares[name]) is not None)
            if tuple(value.shape) != full:
                raise ValueError(f"update_weights: {name!r} has shape {tuple(value.shape)}, the model's is {full}")
        params, dtype = dict(model.named_parameters()), next(model.parameters()).dtype
        with torch.no_grad():
            for name, value in weights.items():
                if (held := self.shares[0][name]) is not None:
                    params[held[0]].copy_(held[1].take(value.detach()))
        self.broadcast("weights", list(weights))
        with self.watch(), torch.no_grad():
            for rank in range(1, self.world):
                for name, value in weights.items():
                    if (held := self.shares[rank][name]) is not None:
                        dist.send(held[1].take(value.detach()).to(dtype).contiguous(), dst=rank)

    def add_lora(self, request, slot: int) -> None:
        """Every other rank loads the adapter into `slot` (rank 0 has); LmforgeError naming the first rank that
        could not (e.g. the directory is not on its machine)."""
        self.broadcast("add_lora", (request, slot))
        errors = [None] * self.world
        with self.watch():
            dist.gather_object(None, errors, dst=0)
        failed = [(rank, error) for rank, error in enumerate(errors) if error]
        if failed:
            raise LmforgeError(f"LoRA adapter {request.lora_name!r}: tensor parallel rank {failed[0][0]} could not "
                               f"load it ({failed[0][1]})")

    def holdings(self, model: nn.Module, runner) -> list[dict[str, int]]:
        """Every rank's weight, KV-pool and checkpoint-read bytes (rank 0's from `model` and `runner`), in rank
        order."""
        self.broadcast("report")
        out = [None] * self.world
        with self.watch():
            dist.gather_object(holdings(model, runner), out, dst=0)
        return out

    def stop(self, timeout: float = 10.0) -> None:
        """Tells the workers to stop and waits for those it started; kills them after `timeout` seconds."""
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


def split_live(model: nn.Module, world: int) -> tuple[nn.Module, Workers]:
    """A live model (e.g. a trainer's) split over `world` ranks: rank 0's share (returned, filled with the live
    weights) and the other ranks' (in processes this one starts, sent their slices)."""
    cfg = getattr(model, "config", None)
    if not isinstance(cfg, dict):
        raise ValueError("a live model split over tensor-parallel ranks needs its config.json dict as model.config "
                         "(lmforge.models.build_model sets it)")
    dtype = next(model.parameters()).dtype
    workers = Workers.start(LiveSource(cfg, dtype), world)
    try:
        share, _ = empty_shard(cfg, "the live model's config", dtype, 0, world)
        workers.set_weights(share, dict(model.named_parameters()))
    except BaseException:
        workers.stop()
        raise
    return share, workers


def receive(model: nn.Module, shares: Shares, names: list[str]) -> None:
    """A rank > 0's side of `Workers.set_weights`: its slices of `names`, in order, into its parameters."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in names:
            if (held := shares[name]) is not None:
                target = params[held[0]]
                buf = torch.empty_like(target, memory_format=torch.contiguous_format)
                dist.recv(buf, src=0)
                target.copy_(buf)


def _worker(source, rank: int, world: int, init_method: str, shm: str | None, threads: int, ready) -> None:
    """A rank lmforge started: loads (or builds, for a live model) its share, then serves rank 0 until told to stop
    (or until rank 0 is gone: the collective fails and the process exits non-zero)."""
    ready.set()  # about to join the group (Workers.start watches for a death before this)
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING, format=f"lmforge rank {rank}: %(message)s")  # rank 0 logs the rest
    parent = os.getppid()
    init_group(rank, world, init_method, shm, lambda: os.getppid() == parent, [-parent])
    if isinstance(source, LiveSource):
        _serve(*empty_shard(source.cfg, "a live model's config", source.dtype, rank, world))
    else:
        _serve(*load_shard(source, rank, world))


def lora_manager(model: nn.Module, max_loras: int, max_rank: int):
    """Multi-LoRA slots over a rank's share of the model: adapters are checked against the whole layers and each
    rank keeps its parts of them (tensor_parallel.LoraCut)."""
    from lmforge.engine.lora_manager import LoRAManager
    from lmforge.engine.tensor_parallel import lora_cuts
    from lmforge.layers.multi_lora import add_multi_lora

    layers = add_multi_lora(model, max_loras, max_rank)
    return LoRAManager(model, layers, max_loras, max_rank, lora_cuts(model.tp_shares, layers))


def _serve(model: nn.Module, shares: Shares) -> None:
    """Runs rank 0's commands until "stop", then leaves the group."""
    runner = loras = None
    with torch.inference_mode():
        while True:
            command = [None]
            dist.broadcast_object_list(command, src=0)
            kind, payload = command[0]
            if kind == "runner":
                from lmforge.engine.model_runner import ModelRunner

                lora = payload.pop("lora")
                loras = lora_manager(model, *lora) if lora else None
                runner = ModelRunner(model, **payload)
            elif kind == "add_lora":
                error = None
                try:
                    loras.add(*payload)
                except Exception as e:  # reported to rank 0, which unloads the adapter everywhere
                    error = f"{type(e).__name__}: {e}"
                dist.gather_object(error, None, dst=0)
            elif kind == "remove_lora" and loras.get(payload) is not None:  # absent where its loading failed
                loras.remove(payload)
            elif kind == "warm_up":
                runner.warm_up()
            elif kind == "step":
                runner.run_plan(payload)
            elif kind == "weights":
                receive(model, shares, payload)
            elif kind == "refresh":
                runner.refresh()
            elif kind == "sleep":
                runner.release()
            elif kind == "wake":
                runner.allocate()
            elif kind == "report":
                dist.gather_object(holdings(model, runner), None, dst=0)
            elif kind == "stop":
                break
    leave_group()
