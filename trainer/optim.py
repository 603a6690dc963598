"""Optimizers (any torch-interface class named by `_target_`) and learning-rate schedules."""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from hydra.utils import get_class
from omegaconf import OmegaConf
from torch import nn

from trainer.config import ConfigError

# Keys of the optimizer config that are ours, not the optimizer class's.
_OWN_KEYS = {"_target_", "no_decay"}


def param_groups(model: nn.Module, *, weight_decay: float, no_decay: list[str]) -> list[dict[str, Any]]:
    """Two groups: decayed weights, and biases/norms/embeddings (or whatever `no_decay` names) without decay."""
    decay, exempt = [], []
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        lowered = name.lower()
        (exempt if p.ndim < 2 or any(k in lowered for k in no_decay) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": exempt, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def optimizer_kwargs(cfg: Any) -> tuple[type, dict[str, Any]]:
    """The optimizer class and its keyword arguments, checked against its signature before anything is built."""
    settings = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    target = settings["_target_"]
    try:
        cls = get_class(target)
    except Exception as e:
        raise ConfigError(
            f"optimizer._target_={target}: cannot import it ({e}); give a class path like torch.optim.AdamW"
        ) from e
    kwargs = {k: v for k, v in settings.items() if k not in _OWN_KEYS}
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    params = inspect.signature(cls.__init__).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            raise ConfigError(
                f"optimizer {target} takes no argument(s) {unknown}; it accepts {sorted(set(params) - {'self', 'params'})}"
            )
    return cls, kwargs


def build_optimizer(cfg: Any, model: nn.Module, *, device: torch.device) -> torch.optim.Optimizer:
    cls, kwargs = optimizer_kwargs(cfg)
    no_decay = list(cfg.no_decay)
    weight_decay = kwargs.pop("weight_decay", 0.0)
    if kwargs.get("foreach") is None and "foreach" in kwargs:
        # torch picks the per-tensor loop on CPU; the multi-tensor path is faster there, one fused kernel on CUDA.
        del kwargs["foreach"]
        if device.type == "cuda" and cls is torch.optim.AdamW:
            kwargs["fused"] = True
        else:
            kwargs["foreach"] = True
    groups = param_groups(model, weight_decay=weight_decay, no_decay=no_decay)
    return cls(groups, **kwargs)


def lr_factor(step: int, *, name: str, warmup_steps: int, decay_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based): linear warmup, then the decay.

    Warmup reaches the peak at step `warmup_steps`; the decay runs from there to `decay_steps` and stays at
    `min_lr_ratio` after it. `constant` holds the peak after warmup.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if name == "constant":
        return 1.0
    span = max(decay_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / span, 1.0)
    if name == "linear":
        shape = 1.0 - progress
    elif name == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ConfigError(f"scheduler.name={name}: choose one of constant, linear, cosine")
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
