"""Strategies: how the one training loop's model and optimizer are spread over ranks.

A strategy sets up the model and the optimizer together (DeepSpeed's engine needs both), says when
gradients synchronise during accumulation, and clips. The loop calls only these methods.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from trainer.config import ConfigError
from trainer.distributed import ParallelEnv

OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]


class SingleStrategy:
    """One process: the model as it is."""

    name = "single"

    def __init__(self, cfg: Any, env: ParallelEnv, device: torch.device) -> None:
        self.cfg, self.env, self.device = cfg, env, device

    def setup(
        self, module: nn.Module, make_optimizer: OptimizerFactory
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        module = module.to(self.device)
        return module, make_optimizer(module)

    def accumulation_context(self, module: nn.Module, *, sync: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def clip_grad_norm(self, module: nn.Module, max_norm: float) -> torch.Tensor:
        """Total gradient norm before clipping; clips only when max_norm > 0."""
        params = [p for p in module.parameters() if p.grad is not None]
        limit = max_norm if max_norm > 0 else float("inf")
        return torch.nn.utils.clip_grad_norm_(params, limit, foreach=True)

    def unwrap(self, module: nn.Module) -> nn.Module:
        return module


class DDPStrategy(SingleStrategy):
    """A full replica per rank; gradients all-reduced once per optimizer step (no_sync while accumulating)."""

    name = "ddp"

    def setup(
        self, module: nn.Module, make_optimizer: OptimizerFactory
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        if not self.env.distributed:
            raise ConfigError(
                "strategy=ddp needs several ranks but this process is alone; launch with "
                "`torchrun --nproc_per_node N -m trainer.train strategy=ddp` or use strategy=single"
            )
        module = module.to(self.device)
        ids = [self.device.index] if self.device.type == "cuda" else None
        ddp = DistributedDataParallel(module, device_ids=ids)
        return ddp, make_optimizer(ddp)

    def accumulation_context(self, module: nn.Module, *, sync: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if sync else module.no_sync()

    def unwrap(self, module: nn.Module) -> nn.Module:
        return module.module


STRATEGIES: dict[str, type[SingleStrategy]] = {"single": SingleStrategy, "ddp": DDPStrategy}


def build_strategy(cfg: Any, env: ParallelEnv, device: torch.device) -> SingleStrategy:
    if cfg.name not in STRATEGIES:
        raise ConfigError(f"strategy={cfg.name}: choose one of {', '.join(STRATEGIES)}")
    return STRATEGIES[cfg.name](cfg, env, device)
