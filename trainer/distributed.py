"""Process-group set-up from the launcher's environment (torchrun, the deepspeed launcher, or srun)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from trainer.errors import LaunchError


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
    if int(env.get("SLURM_STEP_NUM_TASKS", "1")) > 1 and "MASTER_ADDR" not in env:
        # Each task would otherwise train alone, N copies of a single-process job.
        raise LaunchError(
            f"srun started {env['SLURM_STEP_NUM_TASKS']} tasks but MASTER_ADDR is not set, so they cannot form "
            "one job; run one task per node that starts torchrun (launch/slurm/train.sbatch), or export "
            "MASTER_ADDR (the first node, e.g. $(scontrol show hostnames $SLURM_JOB_NODELIST | head -n 1)) "
            "and MASTER_PORT before srun"
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "MASTER_ADDR" in env:
        return ParallelEnv(
            int(env["SLURM_PROCID"]),
            int(env.get("SLURM_STEP_NUM_TASKS", env["SLURM_NTASKS"])),  # this step's tasks, not the job's
            int(env.get("SLURM_LOCALID", 0)),
        )
    return ParallelEnv()


def init_distributed(
    env: ParallelEnv, *, backend: str | None, device: torch.device, one_rank_group: bool = False
) -> None:
    """The process group of a multi-rank launch; with `one_rank_group`, a one-rank group for a lone process.

    A one-rank group (FSDP or ZeRO on one device, started alone or by a launcher with one process) needs no
    rendezvous, so it uses an in-process store: no address, port or file for the user to set, none to clash.
    """
    if dist.is_initialized() or not (env.distributed or one_rank_group):
        return
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    os.environ.setdefault("RANK", str(env.rank))
    os.environ.setdefault("WORLD_SIZE", str(env.world_size))
    os.environ.setdefault("LOCAL_RANK", str(env.local_rank))  # DeepSpeed reads it (srun does not set it)
    timeout = timedelta(minutes=30)
    if not env.distributed:
        dist.init_process_group(
            backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
        )
        return
    os.environ.setdefault("MASTER_PORT", "29500")
    store = _elastic_attempt_store(env, timeout)
    if store is None:
        dist.init_process_group(backend=backend, timeout=timeout)
    else:
        dist.init_process_group(
            backend=backend, store=store, rank=env.rank, world_size=env.world_size, timeout=timeout
        )


def _elastic_attempt_store(env: ParallelEnv, timeout: timedelta) -> dist.Store | None:
    """Under torchrun, the agent's store with a key prefix of its own for each restart attempt.

    torchrun's static rendezvous keeps one store across worker restarts and the workers' env:// init adds no
    per-attempt prefix, so restarted ranks can read the dead ranks' gloo/nccl addresses and hang in
    init_process_group. Prefixing with the restart count keeps each attempt's keys apart.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    agent_store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        env.world_size,
        is_master=False,
        timeout=timeout,
    )
    return dist.PrefixStore(f"trainer/attempt_{attempt}/", agent_store)


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
