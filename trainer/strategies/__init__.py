"""Strategies: how the one training loop's model and optimizer are spread over ranks.

`base.Strategy` is the contract (and the one-process strategy); one file per family refines it. `build_strategy`
maps the config's `strategy.name` to an instance; nothing outside this package compares strategy names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from trainer.distributed import ParallelEnv
from trainer.errors import ConfigError
from trainer.strategies.base import OptimizerFactory, Piece, Strategy, canonical_name, named_parameters
from trainer.strategies.ddp import DDPStrategy
from trainer.strategies.fsdp import FSDPStrategy, shard_frozen
from trainer.strategies.zero import ZeroStrategy, deepspeed_config

STRATEGIES: dict[str, Callable[..., Strategy]] = {
    "single": Strategy,
    "ddp": DDPStrategy,
    "fsdp": FSDPStrategy,
    "zero1": lambda *a: ZeroStrategy(*a, stage=1),
    "zero2": lambda *a: ZeroStrategy(*a, stage=2),
    "zero3": lambda *a: ZeroStrategy(*a, stage=3),
}


def build_strategy(cfg: Any, env: ParallelEnv, device: torch.device) -> Strategy:
    """The configured strategy; it checks the rank count, precision and optimizer before any work."""
    name = str(cfg.strategy.name)
    if name not in STRATEGIES:
        raise ConfigError(f"strategy={name}: choose one of {', '.join(STRATEGIES)}")
    return STRATEGIES[name](cfg, env, device)


__all__ = [
    "STRATEGIES",
    "DDPStrategy",
    "FSDPStrategy",
    "OptimizerFactory",
    "Piece",
    "Strategy",
    "ZeroStrategy",
    "build_strategy",
    "canonical_name",
    "deepspeed_config",
    "named_parameters",
    "shard_frozen",
]
