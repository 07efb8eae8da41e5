"""Training across processes with torch.distributed: joining the job torchrun (or SLURM's srun) started, wrapping
the model in DDP or FSDP2, and the few collectives a recipe needs. A process started without a launcher is a world
of one: `SINGLE`, and every function here is then a no-op or a plain local computation.

    world = join(device)                    # reads RANK / WORLD_SIZE / LOCAL_RANK (or SLURM_*), init_process_group
    runner, strategy = wrap(model, cfg, world, device)  # DDP, FSDP2 per block, or the model itself
    ... runner(ids, pos, meta) in the loop; syncing(runner, strategy, last) around each micro-batch's backward
"""

import contextlib
import logging
import os

import torch
import torch.distributed as dist
from torch import nn

from lmforge.config import TrainConfig
from lmforge.errors import LmforgeError
from lmforge.layers.nf4 import NF4Linear
from lmforge.world import SINGLE, World, world_from_env  # noqa: F401 (recipes use dist.World, dist.SINGLE)

log = logging.getLogger("lmforge")


def device_for(cfg: TrainConfig, world: World) -> torch.device:
    """CUDA device LOCAL_RANK when training on GPUs (one process per GPU), else the CPU."""
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if not cuda:
        return torch.device("cpu")
    if world.local_rank >= torch.cuda.device_count():
        raise LmforgeError(f"local rank {world.local_rank} has no GPU: this machine has {torch.cuda.device_count()}; "
                           "start at most that many processes per node")
    torch.cuda.set_device(world.local_rank)
    return torch.device("cuda", world.local_rank)


def join(world: World, device: torch.device) -> None:
    """Joins the process group: NCCL between GPUs, gloo between CPU processes."""
    if not world.distributed or dist.is_initialized():
        return
    if device.type == "cuda":
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    log.info("rank %d of %d joined (%s, local rank %d)", world.rank, world.size, dist.get_backend(), world.local_rank)


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def all_sum(values: list[float], world: World, device: torch.device) -> list[float]:
    """Element-wise sums over ranks (one all-reduce); the values themselves in a single process."""
    if not world.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def weight_bytes(model: nn.Module) -> int:
    """Bytes of this rank's parameters and buffers (QLoRA's NF4 codes), its shards under FSDP."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(_local(t).numel() * t.element_size() for t in tensors)


def optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of this rank's optimizer state (its shards under FSDP)."""
    return sum(_local(t).numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
               if isinstance(t, torch.Tensor) and t.dim() > 0)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def choose_strategy(cfg: TrainConfig, world: World, model: nn.Module, device: torch.device) -> str:
    """"single", "ddp" or "fsdp". auto: DDP when a whole copy of the training state (weights, gradients, AdamW's
    two moments) fits comfortably on a device, FSDP otherwise; the decision and its numbers are logged."""
    if not world.distributed:
        return "single"
    asked = cfg.distributed.strategy
    if asked != "auto":
        return asked
    if cfg.recipe in ("reward", "grpo"):  # reward: saved whole from rank 0; grpo: every rank's engine needs it whole
        log.info("distributed.strategy auto chose ddp: recipe %s trains under DDP only", cfg.recipe)
        return "ddp"
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    need = weights + trained * (4 + 8)  # an fp32 gradient and two fp32 moments per trained weight
    if device.type == "cuda":
        capacity = torch.cuda.get_device_properties(device).total_memory
        where = f"GPU {device.index}"
    else:  # the processes of a node share its memory
        capacity = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // world.local_size
        where = f"1/{world.local_size} of this node's memory"
    choice = "ddp" if need <= 0.5 * capacity else "fsdp"
    log.info("distributed.strategy auto chose %s: weights + gradients + optimizer state take %.2f GiB per copy, "
             "%s is %.2f GiB (DDP when the copy needs at most half)", choice, need / 2**30, where,
             capacity / 2**30)
    return choice


def wrap(model: nn.Module, cfg: TrainConfig, world: World, device: torch.device) -> tuple[nn.Module, str]:
    """(runner, strategy): the module to call in the training loop (DDP's wrapper, or the model itself sharded in
    place by FSDP2) and the strategy used."""
    strategy = choose_strategy(cfg, world, model, device)
    if strategy == "single":
        return model, strategy
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False,
                                       gradient_as_bucket_view=True), strategy
    _shard(model, cfg, world, device)
    return model, strategy


def _shard(model: nn.Module, cfg: TrainConfig, world: World, device: torch.device) -> None:
    """FSDP2: each decoder block is its own unit (all-gathered just before it runs, freed after), the root holds
    the embeddings, final norm and head. shard: full frees a block's gathered weights after its forward
    (parameters, gradients and optimizer state all sharded: ZeRO-3); grad_op keeps them until backward (ZeRO-2)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if cfg.precision == "fp16-mixed":
        raise LmforgeError("precision fp16-mixed is not supported with distributed.strategy fsdp (each rank would "
                           "skip steps on its own shard's overflow); use bf16-mixed, or strategy ddp")
    mesh = init_device_mesh(device.type, (world.size,))
    compute = {"bf16-mixed": torch.bfloat16, "fp32": None}[cfg.precision]
    options = {"mesh": mesh, "reshard_after_forward": cfg.distributed.shard == "full",
               "mp_policy": MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32),
               "offload_policy": CPUOffloadPolicy(pin_memory=device.type == "cuda") if cfg.distributed.cpu_offload
               else OffloadPolicy()}
    for layer in model.model.layers:
        for module in layer.modules():
            if isinstance(module, NF4Linear):  # QLoRA's base: integer codes, gathered as they are (no cast)
                _buffers_to_frozen_parameters(module, ("weight_packed", "scale_codes", "scale_factor"))
                fully_shard(module, **{**options, "mp_policy": MixedPrecisionPolicy()})
        fully_shard(layer, **options)
    # the root stays gathered from forward to backward: the loss uses the LM head after the model's forward
    fully_shard(model, **{**options, "reshard_after_forward": False})


def _buffers_to_frozen_parameters(module: nn.Module, names: tuple[str, ...]) -> None:
    """FSDP2 shards parameters, not buffers: NF4 codes and scales become frozen parameters (same names, same
    state-dict keys) so that each rank keeps only its share of the quantised base."""
    for name in names:
        module.register_parameter(name, nn.Parameter(module._buffers.pop(name), requires_grad=False))


def syncing(runner: nn.Module, strategy: str, sync: bool):
    """Context for one micro-batch's backward: gradients are reduced across ranks only when `sync` (the window's
    last micro-batch), so accumulation costs one reduction per optimizer step."""
    if strategy == "ddp" and not sync:
        return runner.no_sync()
    if strategy == "fsdp":
        runner.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def launch(nproc: int, argv: list[str]) -> int:
    """`lmforge train ... --nproc N`: the same command in N local processes under torchrun, whose agent runs in this
    process (a process of its own spent 1.5 s importing torch again); 1 when a rank failed (torchrun has stopped the
    others; the failed rank's error is in its output, and the rank is named last), else 0."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # torchrun's own default for its processes, without its banner
    args = ["--standalone", f"--nproc-per-node={nproc}", "-m", "lmforge", *argv]
    log.info("starting %d processes: torchrun %s", nproc, " ".join(args))
    try:
        torchrun.main(args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        log.error("rank %d failed first (exit code %s): its error is above; torchrun stopped the other ranks", rank,
                  failure.exitcode)
        return 1
    return 0
