"""DDP: a full replica per rank; gradients all-reduced once per optimizer step (no_sync while accumulating)."""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from trainer.strategies.base import OptimizerFactory, Strategy


class DDPStrategy(Strategy):
    name = "ddp"
    one_process = False

    def setup(
        self, module: nn.Module, make_optimizer: OptimizerFactory
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        module = self._prepare(module)
        # Frozen parameters (an adapter's base) are the same on every rank by construction and get no gradient:
        # DDP need not broadcast them at start (its flat buckets cannot hold an NF4 base's tensor subclass).
        frozen = [name for name, p in module.named_parameters() if not p.requires_grad]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, frozen)
        ids = [self.device.index] if self.device.type == "cuda" else None
        ddp = DistributedDataParallel(module, device_ids=ids)
        return ddp, make_optimizer(ddp)

    def accumulation_context(self, module: nn.Module, *, sync: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if sync else module.no_sync()

    def eval_module(self, module: nn.Module) -> nn.Module:
        return module.module
