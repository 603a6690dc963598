"""Optimizers (any torch-interface class named by `_target_`) and learning-rate schedules.

A few shipped optimizers need more than torch: a package (apex, DeepSpeed, bitsandbytes), an NVIDIA GPU,
or tensors laid out a certain way (not FSDP2's DTensors, not ZeRO's flat partitions). `check_optimizer`
says so before any work starts, naming what to install, the hardware needed, or the alternative.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from hydra.utils import get_class
from omegaconf import OmegaConf
from torch import nn

from trainer.errors import ConfigError, MissingPackageError
from trainer.utils import require

# Keys of the optimizer config that are ours, not the optimizer class's.
_OWN_KEYS = {"_target_", "no_decay"}

APEX_INSTALL = (
    'pip install -v --no-build-isolation --config-settings "--build-option=--cpp_ext" '
    '--config-settings "--build-option=--cuda_ext" git+https://github.com/NVIDIA/apex'
)
_APEX = "NVIDIA apex built with its CUDA extensions (the PyPI package named `apex` is another project)"
_NOT_DTENSOR = (
    "its fused kernels take plain tensors and FSDP2 shards parameters as DTensors; "
    "use strategy=ddp or zero1/2/3, or optimizer=adamw with fsdp"
)


@dataclass(frozen=True)
class _Needs:
    """What an optimizer class needs beyond torch, and why it cannot serve a strategy (None: it can)."""

    package: str | None = None  # module that must import
    extra: str | None = None  # our extra that installs it; else `install` says how to get `what`
    install: str = ""
    what: str = ""
    cuda: bool = False  # CUDA kernels only
    cpu_twin: str | None = None  # the class that steps CPU-offloaded states instead (ZeRO offload)
    probe_cpu: bool = False  # try one step on CPU before promising it runs there
    not_fsdp: str | None = None
    not_zero: str | None = None


_KNOWN: dict[str, _Needs] = {
    "apex.optimizers.FusedAdam": _Needs(
        package="apex.optimizers", install=APEX_INSTALL, what=_APEX, cuda=True, not_fsdp=_NOT_DTENSOR
    ),
    "apex.optimizers.FusedLAMB": _Needs(
        package="apex.optimizers",
        install=APEX_INSTALL,
        what=_APEX,
        cuda=True,
        not_fsdp=_NOT_DTENSOR,
        not_zero="LAMB scales each tensor's update by that tensor's trust ratio (weight norm / update norm), "
        "and DeepSpeed hands the optimizer flat partitions that mix many tensors; use strategy=ddp",
    ),
    "deepspeed.ops.adam.FusedAdam": _Needs(
        package="deepspeed",
        extra="deepspeed",
        cuda=True,
        cpu_twin="deepspeed.ops.adam.DeepSpeedCPUAdam",
        not_fsdp=_NOT_DTENSOR,
    ),
    "torch.optim.Adafactor": _Needs(
        not_fsdp="torch's Adafactor updates its row and column statistics in place from norms over a sharded "
        "dimension, which FSDP2's DTensor shards refuse; use strategy=ddp",
        not_zero="Adafactor factors each matrix's second moment over its rows and columns and scales each "
        "step by the parameter's RMS, and DeepSpeed hands the optimizer flat 1-D partitions that mix many "
        "tensors; use strategy=ddp",
    ),
    "bitsandbytes.optim.AdamW8bit": _Needs(
        package="bitsandbytes",
        extra="bnb",
        probe_cpu=True,
        not_fsdp="bitsandbytes' kernels take plain tensors and FSDP2 shards parameters as DTensors; "
        "use strategy=ddp, or optimizer=adamw with fsdp",
        not_zero="its states are quantized in blocks of DeepSpeed's flat partitions, which the checkpoint "
        "cannot store per parameter (nor reshard); use strategy=ddp, or optimizer=adamw with ZeRO",
    ),
}


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


@functools.cache
def _bitsandbytes_cpu_error() -> str | None:
    """Why bitsandbytes' 8-bit AdamW cannot step a CPU tensor here (None: it can; older versions are CUDA-only)."""
    import bitsandbytes as bnb

    try:
        p = torch.zeros(512, requires_grad=True)
        p.grad = torch.ones_like(p)
        bnb.optim.AdamW8bit([p], min_8bit_size=0).step()
    except Exception as e:  # a missing kernel shows up as whatever its backend raises
        return f"bitsandbytes {getattr(bnb, '__version__', '?')}: {type(e).__name__}: {e}"
    return None


def _usable_target(cfg: Any, *, device: torch.device, offload: bool) -> str:
    """The class path to build: the configured one, or its CPU twin when offloaded; checks package and hardware."""
    target = cfg._target_ if hasattr(cfg, "_target_") else cfg["_target_"]
    needs = _KNOWN.get(target)
    if needs is None:
        return target
    if offload and needs.cpu_twin:
        target = needs.cpu_twin
    elif needs.cuda and offload:
        raise ConfigError(
            f"optimizer {target} runs CUDA kernels only, but strategy.offload_optimizer=cpu keeps its states in "
            "CPU memory; use optimizer=adam_deepspeed (DeepSpeedCPUAdam steps offloaded states) or adamw"
        )
    elif needs.cuda and device.type != "cuda":
        twin = (
            ", or ZeRO with strategy.offload_optimizer=cpu (DeepSpeedCPUAdam steps the states on the CPU)"
            if needs.cpu_twin
            else ""
        )
        raise ConfigError(
            f"optimizer {target} runs CUDA kernels only and needs an NVIDIA GPU, but this run is on "
            f"{device.type}; use optimizer=adamw (fused on CUDA, multi-tensor on CPU){twin}"
        )
    if needs.extra:
        require(needs.package, extra=needs.extra)
    elif needs.package:
        try:
            importlib.import_module(needs.package)
        except ImportError as e:
            raise MissingPackageError(
                f"optimizer {target} needs {needs.what}, but {needs.package} does not import ({e}); "
                f"install it with: {needs.install}"
            ) from e
    if needs.probe_cpu and device.type == "cpu" and (reason := _bitsandbytes_cpu_error()):
        raise ConfigError(
            f"optimizer {target} cannot run on the CPU with this bitsandbytes ({reason}); it needs an NVIDIA GPU "
            "(CUDA), or a bitsandbytes with a CPU backend (pip install -U bitsandbytes), or use optimizer=adamw"
        )
    return target


def optimizer_kwargs(cfg: Any, *, target: str | None = None) -> tuple[type, dict[str, Any]]:
    """The optimizer class and its keyword arguments, checked against its signature before anything is built."""
    settings = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    target = target or settings["_target_"]
    try:
        cls = get_class(target)
    except Exception as e:
        raise ConfigError(
            f"optimizer._target_={target}: cannot import it ({e}); give a class path like torch.optim.AdamW"
        ) from e
    # YAML lists are tuples to torch (betas, Adafactor's eps pair).
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in settings.items() if k not in _OWN_KEYS}
    params = inspect.signature(cls.__init__).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            accepted = sorted(set(params) - {"self", "params", "model_params"})
            raise ConfigError(f"optimizer {target} takes no argument(s) {unknown}; it accepts {accepted}")
    return cls, kwargs


def check_optimizer(cfg: Any, *, device: torch.device, strategy: Any = None) -> None:
    """Fail before any work if the optimizer cannot run here: its package, the hardware, or the strategy's
    layout (`strategy`: a `trainer.strategies.Strategy`, asked what it does to the tensors; None: one process)."""
    offload = strategy is not None and strategy.offloads_optimizer
    needs = _KNOWN.get(cfg._target_, _Needs())
    if strategy is not None and strategy.dtensor_parameters and needs.not_fsdp:
        raise ConfigError(f"optimizer {cfg._target_} cannot run under {strategy}: {needs.not_fsdp}")
    if strategy is not None and strategy.flat_partitions and needs.not_zero:
        raise ConfigError(f"optimizer {cfg._target_} cannot run under {strategy}: {needs.not_zero}")
    optimizer_kwargs(cfg, target=_usable_target(cfg, device=device, offload=offload))


def build_optimizer(
    cfg: Any, model: nn.Module, *, device: torch.device, offload: bool = False
) -> torch.optim.Optimizer:
    """The configured optimizer over `model`'s parameter groups.

    `offload`: the states live in CPU memory (ZeRO's offload, `Strategy.offloads_optimizer`), so an optimizer
    with a CPU twin (FusedAdam -> DeepSpeedCPUAdam) gets it.
    """
    cls, kwargs = optimizer_kwargs(cfg, target=_usable_target(cfg, device=device, offload=offload))
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
    with (
        deepspeed_parsable_arch_list()
        if cls.__module__.startswith("deepspeed.")
        else contextlib.nullcontext()
    ):
        return cls(groups, **kwargs)  # DeepSpeed's fused ops are JIT-built here


# An architecture with a family suffix, as torch accepts it in TORCH_CUDA_ARCH_LIST: 9.0a, 10.0f.
_ARCH_WITH_SUFFIX = re.compile(r"\b(\d+\.\d+)[a-z]+")


@contextlib.contextmanager
def deepspeed_parsable_arch_list() -> Iterator[None]:
    """TORCH_CUDA_ARCH_LIST as DeepSpeed's JIT builder parses it, for the time of a build.

    DeepSpeed reads each entry as MAJOR.MINOR[+PTX] and stops with "invalid literal for int()" on the family
    suffixes torch accepts (CUDA images for Hopper set 9.0a): the build gets the plain numbers, and the
    user's value is back afterwards.
    """
    configured = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if configured is None or not _ARCH_WITH_SUFFIX.search(configured):
        yield
        return
    os.environ["TORCH_CUDA_ARCH_LIST"] = _ARCH_WITH_SUFFIX.sub(r"\1", configured)
    try:
        yield
    finally:
        os.environ["TORCH_CUDA_ARCH_LIST"] = configured


# Decay shapes: 1 at progress 0, 0 at progress 1. `1-sqrt` (Hägele et al. 2024) suits a short final decay.
_SHAPES = {
    "linear": lambda x: 1.0 - x,
    "cosine": lambda x: 0.5 * (1.0 + math.cos(math.pi * x)),
    "1-sqrt": lambda x: 1.0 - math.sqrt(x),
}


def lr_factor(
    step: int,
    *,
    name: str,
    warmup_steps: int,
    decay_steps: int,
    min_lr_ratio: float,
    decay_fraction: float | None = None,
    decay_shape: str | None = None,
) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based): linear warmup, then the decay.

    Warmup reaches the peak at step `warmup_steps`; the decay runs from there to `decay_steps` and stays at
    `min_lr_ratio` after it. `constant` holds the peak after warmup. `wsd` holds the peak until the last
    `decay_fraction` of the horizon `decay_steps` (never before warmup ends), then decays in `decay_shape`.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if name == "constant":
        return 1.0
    if name == "wsd":
        if decay_fraction is None or decay_shape not in _SHAPES:
            raise ConfigError(
                f"scheduler=wsd needs decay_fraction and decay_shape (one of {', '.join(_SHAPES)}); "
                f"got {decay_fraction}, {decay_shape}: compute it with schedule_factor(step, cfg.scheduler, ...)"
            )
        start = max(float(warmup_steps), decay_steps * (1.0 - decay_fraction))
        if step < start:
            return 1.0
        progress = min((step - start) / max(decay_steps - start, 1.0), 1.0)
        shape = _SHAPES[decay_shape](progress)
    elif name in ("linear", "cosine"):
        span = max(decay_steps - warmup_steps, 1)
        shape = _SHAPES[name](min((step - warmup_steps) / span, 1.0))
    else:
        raise ConfigError(f"scheduler.name={name}: choose one of constant, linear, cosine, wsd")
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


def schedule_factor(step: int, cfg: Any, *, max_steps: int) -> float:
    """`lr_factor` for a `scheduler` config (its horizon `decay_steps`, or `max_steps` when null)."""
    return lr_factor(
        step,
        name=cfg.name,
        warmup_steps=cfg.warmup_steps,
        decay_steps=cfg.decay_steps or max_steps,
        min_lr_ratio=cfg.min_lr_ratio,
        decay_fraction=cfg.get("decay_fraction"),
        decay_shape=cfg.get("decay_shape"),
    )


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
