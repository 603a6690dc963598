"""One run directory per job: the same on every rank and node, and the same again after a requeue.

Hydra's default `outputs/DATE/TIME` is computed by each process, so ranks started a second apart would each
get one. `conf/config.yaml` sets `hydra.run.dir: ${job_run_dir:DEFAULT}`; this resolver answers from the job's
identity, which every rank shares, and falls back to DEFAULT for a lone process. An explicit
`hydra.run.dir=...` override still wins.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from trainer.errors import ConfigError

# Set by launch/slurm/train.sbatch (outputs/slurm-JOBID), or by the user: the run directory, verbatim.
RUN_DIR_VAR = "TRAINER_RUN_DIR"


def job_run_dir(default: str, environ: Mapping[str, str] | None = None) -> str:
    """The run directory of this process's job; `default` when it runs alone."""
    env = os.environ if environ is None else environ
    if env.get(RUN_DIR_VAR):
        return env[RUN_DIR_VAR]
    run_id = env.get("TORCHELASTIC_RUN_ID")  # torchrun's --rdzv-id, the same on every node
    if run_id and run_id != "none":
        return f"outputs/torchrun-{run_id}"
    if run_id == "none":  # torchrun without --rdzv-id: its workers on this node share the agent as parent
        if env.get("LOCAL_WORLD_SIZE", "1") != env.get("WORLD_SIZE", "1"):
            raise ConfigError(
                "torchrun on several nodes without --rdzv-id: the nodes cannot agree on a run directory; "
                f"pass the same --rdzv-id on every node, or hydra.run.dir=DIR, or set {RUN_DIR_VAR}"
            )
        return f"outputs/torchrun-{socket.gethostname()}-{os.getppid()}"
    if int(env.get("SLURM_STEP_NUM_TASKS", "1")) > 1:  # srun -n N python -m trainer.train
        return f"outputs/slurm-{env['SLURM_JOB_ID']}.{env.get('SLURM_STEP_ID', '0')}"
    return default


def register_resolver() -> None:
    OmegaConf.register_new_resolver("job_run_dir", job_run_dir, replace=True)


def write_hydra_record(cfg: Any, run_dir: Path) -> None:
    """`.hydra/config.yaml`, `hydra.yaml` and `overrides.yaml` in the run directory, as Hydra writes them, once
    the run directory is accepted. conf/config.yaml turns Hydra's own writing off (`hydra.output_subdir: null`):
    it comes before the task runs, so a run refused for a directory that holds checkpoints would have replaced
    the config those checkpoints were trained with (which trainer.export and teachers read back). Called by
    trainer/train.py's Hydra job, once the run directory is accepted."""
    hydra_cfg = HydraConfig.get()
    out = run_dir / ".hydra"
    out.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, out / "config.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": OmegaConf.to_container(hydra_cfg)}), out / "hydra.yaml")
    OmegaConf.save(hydra_cfg.overrides.task, out / "overrides.yaml")
