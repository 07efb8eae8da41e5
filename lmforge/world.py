"""A process's place in a launch of several (torchrun's RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE, else
SLURM's srun variables), for training (train/dist.py) and tensor-parallel serving (engine/tp_workers.py) alike."""

import os
from dataclasses import dataclass

from lmforge.errors import LmforgeError


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int
    local_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


SINGLE = World(0, 1, 0, 1)


def world_from_env(env: dict | None = None) -> World:
    """The process's place in the job: torchrun's variables, else SLURM's (srun with several tasks), else single."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    elif int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        names = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE")
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in env]
        if missing:
            raise LmforgeError(f"running under SLURM with {env['SLURM_NTASKS']} tasks but {' and '.join(missing)} "
                               "is not set; export MASTER_ADDR (the first host of $SLURM_JOB_NODELIST) and "
                               "MASTER_PORT, or launch with torchrun")
    else:
        return SINGLE
    try:
        rank, size = int(env[names[0]]), int(env[names[1]])
        local_rank = int(env.get(names[2], rank))
        local_size = int(str(env.get(names[3], size)).split("(")[0])  # SLURM writes e.g. "2(x3)"
    except ValueError as e:
        raise LmforgeError(f"cannot read the distributed environment ({', '.join(names)}): {e}") from None
    if not 0 <= rank < size:
        raise LmforgeError(f"{names[0]}={rank} is not within {names[1]}={size}")
    return World(rank, size, local_rank, local_size)
