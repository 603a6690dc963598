"""Process-group set-up from the launcher's environment (torchrun, the deepspeed launcher, or srun)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def read_env(environ: dict[str, str] | None = None) -> ParallelEnv:
    """Rank, world size and local rank: torchrun/deepspeed set RANK etc.; srun without them sets SLURM_*."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return ParallelEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "MASTER_ADDR" in env:
        return ParallelEnv(
            int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
        )
    return ParallelEnv()


def init_distributed(env: ParallelEnv, *, backend: str | None, device: torch.device) -> None:
    if not env.distributed or dist.is_initialized():
        return
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    os.environ.setdefault("RANK", str(env.rank))
    os.environ.setdefault("WORLD_SIZE", str(env.world_size))
    os.environ.setdefault("MASTER_PORT", "29500")
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_ints(value: int, device: torch.device) -> list[int]:
    """One integer from every rank, in rank order."""
    if not dist.is_initialized():
        return [value]
    out = [torch.zeros((), dtype=torch.long, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(out, torch.tensor(value, dtype=torch.long, device=device))
    return [int(t) for t in out]


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
