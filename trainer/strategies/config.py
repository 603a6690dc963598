"""The strategy group's schema (conf/strategy/*.yaml) and the checks its types cannot express.

The module itself imports no torch: `trainer.config` composes it. The defaults live in the YAMLs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from trainer.choices import Choice
from trainer.errors import ConfigError

StrategyName = Choice("StrategyName", "single ddp fsdp zero1 zero2 zero3")
# Where ZeRO keeps optimizer states or parameters: on the device, or in CPU memory (DeepSpeed's offload).
Offload = Choice("Offload", "none cpu")
DEEPSPEED = (StrategyName.zero1, StrategyName.zero2, StrategyName.zero3)  # the strategies DeepSpeed runs


@dataclass
class StrategyConfig:
    name: StrategyName = MISSING
    # Process group backend; null picks nccl on CUDA, gloo on CPU.
    backend: str | None = MISSING
    # FSDP: free each block's gathered parameters after its forward (re-gather in backward).
    reshard_after_forward: bool = MISSING
    # FSDP: keep sharded parameters, gradients and optimizer states in CPU memory.
    cpu_offload: bool = MISSING
    # FSDP: hold unsharded gradients over the micro-batches and reduce-scatter once at the last (less
    # communication, a whole gradient per rank); false reduce-scatters every micro-batch (sharded gradients).
    defer_grad_sync: bool = MISSING
    # FSDP: replica groups; > 1 gives HSDP (shard within world/replicate ranks, replicate across groups).
    replicate_degree: int = MISSING
    # ZeRO: the optimizer states (and step).
    offload_optimizer: Offload = MISSING
    # ZeRO-3: the parameters.
    offload_params: Offload = MISSING
    # ZeRO: extra DeepSpeed config keys merged over the generated config (e.g. {zero_optimization: {...}});
    # null for none. Typed Any so that `strategy.deepspeed={...}` can bring keys the schema does not know.
    deepspeed: Any = MISSING


def register_strategy_configs() -> None:
    ConfigStore.instance().store(group="strategy", name="schema", node=StrategyConfig)


def validate_strategy(s: Any) -> None:
    extra = s.deepspeed
    _refuse_unless(
        extra is None or (OmegaConf.is_dict(extra) or isinstance(extra, dict)),
        f"strategy.deepspeed={extra}: must be a mapping of DeepSpeed keys, e.g. "
        "'strategy.deepspeed={zero_optimization: {reduce_bucket_size: 50000000}}'",
    )
    _refuse_unless(
        extra is None or s.name in DEEPSPEED,
        f"strategy.deepspeed is set but strategy={s.name} does not run DeepSpeed; "
        "use strategy=zero1, zero2 or zero3, or drop strategy.deepspeed",
    )


def _refuse_unless(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate_fp8_all_gather(cfg: Any) -> None:
    """Float8 all-gather is FSDP2's (torchao's weight wrapper casts before the gather) and needs one scale per
    tensor, which every rank can agree on before it has the whole weight."""
    pr = cfg.precision
    if not pr.fp8_all_gather:
        return
    _refuse_unless(
        str(pr.name) == "fp8" and str(pr.fp8_recipe) == "tensorwise" and str(cfg.strategy.name) == "fsdp",
        f"precision.fp8_all_gather=true all-gathers FSDP's float8 weights, which needs precision=fp8 with "
        f"precision.fp8_recipe=tensorwise and strategy=fsdp; this run has precision={pr.name}, "
        f"precision.fp8_recipe={pr.fp8_recipe}, strategy={cfg.strategy.name}: set those, or "
        "precision.fp8_all_gather=false",
    )
