"""trainer.plan's own options (conf/plan.yaml), given on the command line as `plan.KEY=VALUE` beside the
training overrides. Every default lives in conf/plan.yaml (tests/test_config.py checks it sets every key).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from trainer.errors import ConfigError


@dataclass
class PlanConfig:
    # A device of trainer/plan/devices.py's table, or `cpu` (this machine: its measured matmul rate).
    gpu: str = MISSING
    gpus_per_node: int = MISSING
    nodes: int = MISSING
    # Between nodes: a network of trainer/plan/devices.py's table.
    network: str = MISSING
    # Overrides of the device table's figures (null: the table's).
    memory_gib: float | None = MISSING
    peak_tflops: float | None = MISSING
    intra_node_gbps: float | None = MISSING
    inter_node_gbps: float | None = MISSING
    mfu: float | None = MISSING
    # The fraction of the peak added for fragmentation and the CUDA context.
    fragmentation: float = MISSING
    vocab_size: int | None = MISSING
    alternatives: bool = MISSING
    max_micro_batch: int = MISSING


def register_plan_configs() -> None:
    ConfigStore.instance().store(name="schema_plan", node=PlanConfig)


def validate_plan(p: Any) -> None:
    """The values types cannot check (the device and network names are checked by trainer/plan/devices.py)."""
    for key in ("gpus_per_node", "nodes", "max_micro_batch"):
        if getattr(p, key) < 1:
            raise ConfigError(f"plan.{key}={getattr(p, key)}: must be a positive integer, e.g. plan.{key}=1")
    if not 0 <= p.fragmentation < 1:
        raise ConfigError(f"plan.fragmentation={p.fragmentation}: must be in [0, 1), e.g. 0.05")
    if p.mfu is not None and not 0 < p.mfu <= 1:
        raise ConfigError(f"plan.mfu={p.mfu}: must be in (0, 1], e.g. 0.4")
    for key in ("memory_gib", "peak_tflops", "intra_node_gbps", "inter_node_gbps"):
        value = getattr(p, key)
        if value is not None and value <= 0:
            raise ConfigError(f"plan.{key}={value}: must be > 0, or null for the device table's figure")
