"""The `Strategy` contract, and the one-process strategy that every other one refines.

A strategy sets up the model and the optimizer together (DeepSpeed's engine needs both), runs the backward
pass and the optimizer step, says when gradients synchronise during accumulation, and owns the one view of
what this rank holds: `pieces()` lists the flat ranges of each parameter, gradient and optimizer state that
live on this rank. The checkpoint (`save_slices`/`load_slices`, see `trainer/shards.py`) and the pruning masks
both read that view, so no other module reads FSDP's or DeepSpeed's internals. Other modules ask a strategy
capability questions (`replicated`, `dtensor_parameters`, `flat_partitions`, `offloads_optimizer`), never
its name.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from trainer.distributed import ParallelEnv
from trainer.errors import ConfigError
from trainer.optim import check_optimizer
from trainer.precision import Precision, convert_to_fp8
from trainer.shards import (
    LoadSlice,
    SaveSlice,
    is_number,
    number_load_slice,
    number_save_slices,
    replicated_load_slice,
    replicated_save_slice,
)

OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]
_WRAPPER_PARTS = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


def canonical_name(name: str) -> str:
    """The HF state-dict name of a parameter, whatever wrappers (DDP, compile, checkpointing) sit around it."""
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    name = name.removeprefix("module.")
    return name.removeprefix("model.")  # CausalLMWithLoss holds the HF model as `model`


def named_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(canonical_name(n), p) for n, p in module.named_parameters()]


def trained_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters that train, by HF name: what a checkpoint and `pieces` hold. A frozen parameter (an
    adapter's base) never changes and has no optimizer state: it is rebuilt from the model group, not saved."""
    return [(n, p) for n, p in named_parameters(module) if p.requires_grad]


def group_numbers(optimizer: torch.optim.Optimizer) -> Iterator[tuple[str, dict, str]]:
    """A step count kept per param group (apex's fused optimizers): (key, group, "step")."""
    for i, group in enumerate(optimizer.param_groups):
        if is_number(group.get("step")):
            yield f"optim/param_groups/{i}/step", group, "step"


def init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create the optimizer's state tensors with a zero-lr step on zero gradients (weights stay as they are)."""
    if optimizer.state:
        return
    params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    grads = [p.grad for p in params]  # ZeRO-1/2 with offload keeps its gradient buffers there: put them back
    for p in params:
        p.grad = torch.zeros_like(p)
    saved = [g["lr"] for g in optimizer.param_groups]
    for g in optimizer.param_groups:
        g["lr"] = 0.0
    optimizer.step()
    for g, lr in zip(optimizer.param_groups, saved, strict=True):
        g["lr"] = lr
    for p, grad in zip(params, grads, strict=True):
        p.grad = grad


@dataclass
class Piece:
    """A flat range [start, start + tensor.numel()) of parameter `name` that this rank holds in `tensor`
    (a 1-D view: writing to it changes the model, its gradient or its optimizer state)."""

    name: str
    start: int
    tensor: torch.Tensor
    kind: str  # "weight", "grad" or "state" (a floating state shaped like the parameter: moments)


class Strategy:
    """One process, the model as it is; the base of every strategy (override what differs)."""

    name = "single"
    # Runs without a process group and refuses a multi-process launch. The others run at any world size, one
    # included (a one-rank group): to debug a multi-node config on one machine, or offload to fit one device.
    one_process = True
    # Capabilities other modules ask about instead of comparing names:
    replicated = True  # every rank holds whole parameters, stepped by a torch optimizer over the module's own
    dtensor_parameters = False  # parameters are DTensor shards (FSDP2)
    flat_partitions = False  # the optimizer steps flat partitions of many parameters (DeepSpeed ZeRO)

    def __init__(self, cfg: Any, env: ParallelEnv, device: torch.device) -> None:
        """`cfg` is the whole run config: strategies read `strategy.*` and, for DeepSpeed, `train.*`."""
        self.cfg, self.train_cfg, self.env, self.device = cfg.strategy, cfg.train, env, device
        self.precision = Precision(cfg.precision, device)
        if self.one_process and env.world_size > 1:
            raise ConfigError(
                f"strategy={self.name} runs one process but {env.world_size} were launched; pick a distributed "
                "strategy (strategy=ddp, fsdp, zero1, zero2 or zero3) or launch one process"
            )
        # A missing package, the wrong hardware or a layout the optimizer cannot step fails here, before any work.
        check_optimizer(cfg.optimizer, device=device, strategy=self)

    def __str__(self) -> str:
        return f"strategy={self.name}"  # the override that selects it, as messages name it

    @property
    def offloads_optimizer(self) -> bool:
        """The optimizer states live in CPU memory and are stepped there (ZeRO-Offload)."""
        return False

    # ---- set-up and the step ------------------------------------------------------------------------

    def setup(
        self, module: nn.Module, make_optimizer: OptimizerFactory
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        module = self._prepare(module)
        return module, make_optimizer(module)

    def _prepare(self, module: nn.Module) -> nn.Module:
        """On the device, with fp8 linears when asked, and the fp16 loss scaler made."""
        module = module.to(self.device)
        if self.precision.fp8:
            convert_to_fp8(module, self.precision.fp8_recipe)
        self.precision.make_scaler()
        return module

    def prepare_frozen(self, module: nn.Module) -> nn.Module:
        """A frozen inference module (a distillation teacher) placed like the model: here, whole on the device.

        It runs inside `forward_context`, so in the run's precision; it gets no gradients and no optimizer."""
        return module.requires_grad_(False).eval().to(self.device)

    def forward_context(self) -> contextlib.AbstractContextManager:
        """Around every forward (training and eval): autocast to the compute dtype."""
        return self.precision.autocast()

    def accumulation_context(self, module: nn.Module, *, sync: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def backward(self, module: nn.Module, loss: torch.Tensor) -> None:
        self.precision.scale(loss).backward()

    def clip_and_step(
        self, module: nn.Module, optimizer: torch.optim.Optimizer, max_norm: float, *, skip: bool = False
    ) -> torch.Tensor:
        """Clip (when max_norm > 0), step, zero the gradients; returns the total norm before clipping.

        With fp16 the gradients are unscaled first, and a step whose gradients overflowed is skipped by the
        loss scaler. Without it, a step whose global norm is not finite is not applied, nor one the caller says
        to `skip` (its loss was not finite): the weights and optimizer states stay as they were. The norm is
        global and `skip` is decided from values reduced over ranks, so every rank skips together.
        """
        self.precision.unscale_(optimizer)
        params = [p for p in module.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(
            params, max_norm if max_norm > 0 else float("inf"), foreach=True
        )
        norm = self._full_norm(norm)
        # fp16's scaler decides itself: it skips a step whose gradients overflowed and lowers the scale.
        if self.precision.scaler is not None or not (skip or not torch.isfinite(norm)):
            self.precision.step(optimizer)
        optimizer.zero_grad(set_to_none=True)
        return norm

    def _full_norm(self, norm: torch.Tensor) -> torch.Tensor:
        """The global gradient norm as a plain tensor (FSDP's is a DTensor)."""
        return norm

    def stepping_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """The torch optimizer that does the arithmetic (under ZeRO, the one inside DeepSpeed's wrapper)."""
        return optimizer

    def eval_module(self, module: nn.Module) -> nn.Module:
        """The module to run evaluation forwards on (no gradient-sync hooks)."""
        return module

    def gathered(self, module: nn.Module) -> contextlib.AbstractContextManager:
        """A context in which a module this strategy placed (`prepare_frozen`) holds its root's parameters
        whole: a teacher's LM head, read outside its forward. Here they always are."""
        return contextlib.nullcontext()

    def local_numel(self, module: nn.Module) -> int:
        """Parameter elements of a module this strategy placed that this rank holds (a shard counts its part)."""
        return sum(self._local(p)[1].numel() for p in module.parameters())

    # ---- what this rank holds -----------------------------------------------------------------------

    def _local(self, tensor: torch.Tensor) -> tuple[int, torch.Tensor, bool]:
        """(flat start, the local tensor, whether this rank writes it to a checkpoint): here, all of it."""
        return 0, tensor, True

    def _held(
        self, module: nn.Module, optimizer: torch.optim.Optimizer
    ) -> Iterator[tuple[str, nn.Parameter, str, str | None, torch.Tensor]]:
        """(name, parameter, kind, state key, tensor) for each trained parameter, its gradient and its optimizer
        states."""
        for name, p in trained_parameters(module):
            yield name, p, "weight", None, p
            if p.grad is not None:
                yield name, p, "grad", None, p.grad
            for state_key, value in optimizer.state.get(p, {}).items():
                if torch.is_tensor(value):
                    yield name, p, "state", state_key, value

    def pieces(self, module: nn.Module, optimizer: torch.optim.Optimizer, names: set[str]) -> list[Piece]:
        """Every flat range this rank holds of the named parameters, looked up now (never cached: the tensors
        move under some strategies)."""
        out = []
        for name, p, kind, _, tensor in self._held(module, optimizer):
            if name not in names or (kind == "state" and not _moment_like(tensor, p)):
                continue
            start, local, _ = self._local(tensor)
            out.append(Piece(name, start, local.detach().view(-1), kind))
        return out

    # ---- checkpoint views ---------------------------------------------------------------------------

    def _save(self, key: str, tensor: torch.Tensor) -> list[SaveSlice]:
        return replicated_save_slice(key, tensor, rank=self.env.rank, world_size=self.env.world_size)

    def _load(self, key: str, tensor: torch.Tensor) -> list[LoadSlice]:
        return [replicated_load_slice(key, tensor)]

    def _tensors(
        self, module: nn.Module, optimizer: torch.optim.Optimizer
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """The checkpoint's tensors: the weights and every tensor state, keyed as in the shard files."""
        for name, _, kind, state_key, tensor in self._held(module, optimizer):
            if kind == "weight":
                yield f"model/{name}", tensor
            elif kind == "state":
                yield f"optim/{name}/{state_key}", tensor

    def _numbers(
        self, module: nn.Module, optimizer: torch.optim.Optimizer
    ) -> Iterator[tuple[str, dict, str]]:
        """States kept as Python numbers (key, holder, name): step counts of DeepSpeed's and bitsandbytes'
        optimizers per parameter, of apex's per param group."""
        for name, p in trained_parameters(module):
            state = optimizer.state.get(p, {})
            for state_key, value in state.items():
                if is_number(value):
                    yield f"optim/{name}/{state_key}", state, state_key
        yield from group_numbers(optimizer)

    def save_slices(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> list[SaveSlice]:
        out = [s for key, t in self._tensors(module, optimizer) for s in self._save(key, t)]
        for key, holder, name in self._numbers(module, optimizer):
            out += number_save_slices(key, holder[name], rank=self.env.rank, world_size=self.env.world_size)
        return out

    def load_slices(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> list[LoadSlice]:
        init_optimizer_state(optimizer)
        out = [s for key, t in self._tensors(module, optimizer) for s in self._load(key, t)]
        return out + [number_load_slice(*n) for n in self._numbers(module, optimizer)]

    def full_state_dict(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """Whole weights on CPU, keyed by HF names, on rank 0 (other ranks may get an empty dict)."""
        return {name: p.detach().cpu() for name, p in named_parameters(module)}


def _moment_like(value: torch.Tensor, param: torch.Tensor) -> bool:
    """An optimizer state that is elementwise over the parameter (Adam's moments), not a scalar step count."""
    return value.is_floating_point() and value.numel() == param.numel()
