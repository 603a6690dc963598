"""Experiment logging from rank 0: metrics.jsonl always, plus wandb and TensorBoard when configured.

The loop writes one dict per record (`ExperimentLog.write`, as it did to MetricsLog); each backend gets the
same scalars at the same step. The resolved config goes to `resolved_config.yaml` in the run directory, to
wandb's run config and to a TensorBoard text summary. A resumed run continues the same wandb run: its id is
kept in the run directory.
"""

from __future__ import annotations

import numbers
import secrets
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from trainer.metrics import MetricsLog
from trainer.utils import require

# The wandb run id of this run directory, so that a resumed or requeued job logs into the same run.
WANDB_ID_FILE = "wandb_run_id"


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of a record except `step` (lists such as per-rank memory are left to metrics.jsonl)."""
    return {
        k: float(v)
        for k, v in record.items()
        if k != "step" and isinstance(v, numbers.Real) and not isinstance(v, bool)
    }


class ExperimentLog:
    """Fans each record out to metrics.jsonl, wandb and TensorBoard; does nothing off rank 0."""

    def __init__(self, cfg: Any, *, run_dir: Path, enabled: bool) -> None:
        self.jsonl = MetricsLog(run_dir / "metrics.jsonl", enabled=enabled)
        self._wandb_run = None
        self._tb_writer = None
        if not enabled:
            return
        lcfg = cfg.logger
        # Closed choices as plain strings: wandb and TensorBoard get no Enum (trainer/choices.py).
        resolved = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
        (run_dir / "resolved_config.yaml").write_text(OmegaConf.to_yaml(resolved))
        if lcfg.wandb.mode != "disabled":
            self._wandb_run = _init_wandb(lcfg.wandb, run_dir=run_dir, config=resolved)
        if lcfg.tensorboard:
            tensorboard = require("torch.utils.tensorboard", extra="wandb", package="tensorboard")
            self._tb_writer = tensorboard.SummaryWriter(log_dir=str(run_dir / "tensorboard"))
            self._tb_writer.add_text("config", "```\n" + OmegaConf.to_yaml(resolved) + "```")

    def write(self, record: dict[str, Any]) -> None:
        self.jsonl.write(record)
        values = scalars(record)
        step = int(record["step"])
        if self._wandb_run is not None:
            self._wandb_run.log(values, step=step)
        if self._tb_writer is not None:
            for key, value in values.items():
                self._tb_writer.add_scalar(key, value, global_step=step)
            self._tb_writer.flush()

    def drop_after(self, step: int) -> None:
        """A resumed run: metrics.jsonl forgets the steps after its checkpoint, which it is about to log again
        (wandb keeps its own history and TensorBoard shows the later point)."""
        self.jsonl.drop_after(step)

    def close(self, *, exit_code: int = 0) -> None:
        self.jsonl.close()
        if self._wandb_run is not None:
            self._wandb_run.finish(exit_code=exit_code)
            self._wandb_run = None
        if self._tb_writer is not None:
            self._tb_writer.close()
            self._tb_writer = None


def _init_wandb(wcfg: Any, *, run_dir: Path, config: dict):
    wandb = require("wandb", extra="wandb")
    id_file = run_dir / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
    id_file.write_text(run_id + "\n")
    return wandb.init(
        project=wcfg.project,
        entity=wcfg.entity,
        name=wcfg.name or run_dir.name,
        tags=list(wcfg.tags),
        mode=str(wcfg.mode),
        dir=str(run_dir),
        id=run_id,
        resume="allow",  # the same id again continues the run (offline: `wandb sync` appends the parts)
        config=config,
    )
