"""The optimizer and scheduler groups' schemas (conf/optimizer/*.yaml, conf/scheduler/*.yaml) and the checks
their types cannot express. To add an optimizer: its schema here (a dataclass naming its `_target_`), its YAML
with every option, its default and a one-line comment, and, if it needs a package, a GPU or a layout,
an entry in trainer/optim.py's `_KNOWN`.

The module itself imports no torch; the defaults live in the YAMLs (tests/test_config.py).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from trainer.choices import Choice
from trainer.errors import ConfigError, TrainerWarning

# Learning-rate schedules after a linear warmup, and the shape of wsd's final decay.
SchedulerName = Choice("SchedulerName", "constant linear cosine wsd")
DecayShape = Choice("DecayShape", "linear cosine 1-sqrt")


@dataclass
class OptimizerConfig:
    # Class to build, any optimizer with the torch interface (each schema below names its own).
    _target_: str = MISSING
    lr: float = MISSING
    weight_decay: float = MISSING
    # Parameters whose names contain one of these get no weight decay (biases, norms, embeddings).
    no_decay: list[str] = MISSING


@dataclass
class AdamWConfig(OptimizerConfig):
    _target_: str = "torch.optim.AdamW"
    betas: list[float] = MISSING
    eps: float = MISSING
    # Multi-tensor kernels; `fused` is chosen instead on CUDA.
    foreach: bool | None = MISSING


@dataclass
class SGDConfig(OptimizerConfig):
    _target_: str = "torch.optim.SGD"
    momentum: float = MISSING
    nesterov: bool = MISSING


@dataclass
class LionConfig(OptimizerConfig):
    _target_: str = "trainer.optimizers.Lion"
    betas: list[float] = MISSING
    foreach: bool | None = MISSING


@dataclass
class AdafactorConfig(OptimizerConfig):
    _target_: str = "torch.optim.Adafactor"
    # Exponent of the second-moment decay schedule, beta2_t = 1 - t^beta2_decay.
    beta2_decay: float = MISSING
    # (eps1, eps2): the second-moment floor (null: the dtype's eps) and the floor of a parameter's RMS.
    eps: list[float | None] = MISSING
    # Clipping threshold of the update's RMS.
    d: float = MISSING
    foreach: bool | None = MISSING


@dataclass
class ApexAdamConfig(OptimizerConfig):
    _target_: str = "apex.optimizers.FusedAdam"
    betas: list[float] = MISSING
    eps: float = MISSING
    bias_correction: bool = MISSING
    # Decoupled weight decay (AdamW); false adds it to the gradient (Adam with L2).
    adam_w_mode: bool = MISSING


@dataclass
class ApexLAMBConfig(OptimizerConfig):
    _target_: str = "apex.optimizers.FusedLAMB"
    betas: list[float] = MISSING
    eps: float = MISSING
    bias_correction: bool = MISSING
    adam_w_mode: bool = MISSING
    # LAMB's own clipping of the global gradient norm, after train.grad_clip.
    max_grad_norm: float = MISSING
    # NVLAMB: the trust ratio also for parameters without weight decay.
    use_nvlamb: bool = MISSING


@dataclass
class DeepSpeedAdamConfig(OptimizerConfig):
    # DeepSpeedCPUAdam replaces it when ZeRO offloads the optimizer (strategy.offload_optimizer=cpu).
    _target_: str = "deepspeed.ops.adam.FusedAdam"
    betas: list[float] = MISSING
    eps: float = MISSING
    bias_correction: bool = MISSING


@dataclass
class AdamW8bitConfig(OptimizerConfig):
    _target_: str = "bitsandbytes.optim.AdamW8bit"
    betas: list[float] = MISSING
    eps: float = MISSING
    # Tensors with fewer elements keep 32-bit states.
    min_8bit_size: int = MISSING


@dataclass
class SchedulerConfig:
    name: SchedulerName = MISSING
    warmup_steps: int = MISSING
    # Steps over which the decay runs; null means train.max_steps (set it to extend a run explicitly).
    decay_steps: int | None = MISSING
    # Final learning rate as a fraction of the peak.
    min_lr_ratio: float = MISSING


@dataclass
class WSDSchedulerConfig(SchedulerConfig):
    # Warmup-stable-decay: the peak holds until the last `decay_fraction` of the decay_steps horizon.
    decay_fraction: float = MISSING
    decay_shape: DecayShape = MISSING


def register_optimizer_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(group="optimizer", name="schema_adamw", node=AdamWConfig)
    cs.store(group="optimizer", name="schema_sgd", node=SGDConfig)
    cs.store(group="optimizer", name="schema_lion", node=LionConfig)
    cs.store(group="optimizer", name="schema_adafactor", node=AdafactorConfig)
    cs.store(group="optimizer", name="schema_adamw_apex", node=ApexAdamConfig)
    cs.store(group="optimizer", name="schema_lamb_apex", node=ApexLAMBConfig)
    cs.store(group="optimizer", name="schema_adam_deepspeed", node=DeepSpeedAdamConfig)
    cs.store(group="optimizer", name="schema_adamw_8bit", node=AdamW8bitConfig)
    cs.store(group="scheduler", name="schema", node=SchedulerConfig)
    cs.store(group="scheduler", name="schema_wsd", node=WSDSchedulerConfig)


def validate_optimizer(o: Any) -> None:
    _check(
        math.isfinite(o.lr) and o.lr > 0,
        f"optimizer.lr={o.lr}: the learning rate must be finite and > 0, e.g. optimizer.lr=3e-4",
    )
    _check(o.weight_decay >= 0, f"optimizer.weight_decay={o.weight_decay}: must be >= 0")
    if "betas" in o:  # every Adam-like optimizer refuses them outside [0, 1), once the model is built
        betas = list(o.betas)
        _check(
            len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas),
            f"optimizer.betas={betas}: must be two decay rates, each in [0, 1), e.g. optimizer.betas=[0.9,0.95]",
        )
    if "eps" in o and isinstance(o.eps, float | int):
        _check(o.eps >= 0, f"optimizer.eps={o.eps}: must be >= 0, e.g. optimizer.eps=1e-8")
    if "momentum" in o:
        _check(o.momentum >= 0, f"optimizer.momentum={o.momentum}: must be >= 0")


def validate_scheduler(s: Any, *, max_steps: int) -> None:
    _check(s.warmup_steps >= 0, f"scheduler.warmup_steps={s.warmup_steps}: must be >= 0")
    if 0 < max_steps < s.warmup_steps:
        warnings.warn(
            f"scheduler.warmup_steps={s.warmup_steps} is longer than the run (train.max_steps={max_steps}): the "
            f"learning rate never reaches optimizer.lr; lower scheduler.warmup_steps (e.g. to {max(max_steps // 10, 1)})",
            TrainerWarning,
            stacklevel=3,
        )
    _check(
        s.decay_steps is None or s.decay_steps > 0,
        f"scheduler.decay_steps={s.decay_steps}: must be > 0 or null",
    )
    _check(0.0 <= s.min_lr_ratio <= 1.0, f"scheduler.min_lr_ratio={s.min_lr_ratio}: must be in [0, 1]")
    if s.name is SchedulerName.wsd:
        fraction, shape = s.get("decay_fraction"), s.get("decay_shape")
        _check(
            fraction is not None and shape is not None,
            "scheduler.name=wsd needs decay_fraction and decay_shape: choose it with scheduler=wsd",
        )
        _check(0.0 < fraction <= 1.0, f"scheduler.decay_fraction={fraction}: must be in (0, 1]")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)
