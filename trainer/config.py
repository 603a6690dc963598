"""The training config's composition root: `Config` composes the groups of conf/config.yaml, `register_configs`
puts the schemas in Hydra's ConfigStore, and `validate_config` runs each group's checks in order.

Every YAML under `conf/` is merged onto a schema dataclass: an unknown key, a wrong type, a value outside a
closed choice (trainer/choices.py) or a missing required value is a Hydra error at composition. The checks
add what types cannot express (positive sizes, divisibility), each with a message that names the key and the
fix. Each feature's schema and checks live in its folder (data/, quant/, prune/, distill/, peft/, strategies/,
optimizers/ `config.py`); the
other commands register only their own (trainer.quant.config, evaluate_config, report_config,
pipeline_config), so that none of them imports training's. The loop's own groups are here.

Defaults are written once, in the YAML, with their one-line comments: a schema field that a YAML sets has no
default here (MISSING), and every option of a group sets every key of its schema (tests/test_config.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from trainer.activation_checkpointing import is_valid_mode
from trainer.choices import Choice, Dtype, Fp8Recipe, PrecisionName
from trainer.data.config import DataConfig, register_data_configs, validate_data
from trainer.distill.config import DistillConfig, register_distill_configs, validate_distill
from trainer.errors import ConfigError
from trainer.optimizers.config import (
    OptimizerConfig,
    SchedulerConfig,
    register_optimizer_configs,
    validate_optimizer,
    validate_scheduler,
)
from trainer.peft.config import PeftConfig, register_peft_configs, validate_peft
from trainer.profiling import ProfileConfig, validate_profile
from trainer.prune.config import PruneConfig, register_prune_configs, validate_prune
from trainer.quant.config import QuantConfig, register_quant_configs, validate_quant
from trainer.quant.qat import check_qat_installed
from trainer.strategies.config import (
    StrategyConfig,
    register_strategy_configs,
    validate_fp8_all_gather,
    validate_strategy,
)
from trainer.utils import register_package_resolver

# `config`: build a fresh model from `arch` (random init); `pretrained`: load weights from `name_or_path`.
ModelSource = Choice("ModelSource", "config pretrained")
# `offline` needs no account or network (`wandb sync` uploads later); `disabled` does not import wandb.
WandbMode = Choice("WandbMode", "online offline disabled")


@dataclass
class ModelConfig:
    source: ModelSource = MISSING
    # HF hub name or local directory (weights for `pretrained`, an AutoConfig for `config` when `arch` is empty).
    name_or_path: str | None = MISSING
    # GGUF file inside `name_or_path` (needs the `gguf` extra).
    gguf_file: str | None = MISSING
    # Architecture fields passed to the transformers config class (`model_type` picks the class).
    arch: dict[str, Any] = MISSING
    # Run model code from the hub; off unless asked for, since it executes downloaded Python.
    trust_remote_code: bool = MISSING


@dataclass
class TrainConfig:
    max_steps: int = MISSING
    # Sequences per rank per forward/backward.
    micro_batch_size: int = MISSING
    # Sequences per optimizer step over all ranks; accumulation = global / (micro x world).
    global_batch_size: int = MISSING
    seed: int = MISSING
    # Gradient clipping by global norm; 0 disables clipping (the norm is still logged).
    grad_clip: float = MISSING
    log_every: int = MISSING
    # 0 evaluates only at the end.
    eval_every: int = MISSING
    # Eval batches (of micro_batch_size) per evaluation; 0 uses the whole eval split.
    eval_batches: int = MISSING
    # false, true (recompute each block in the backward) or selective (recompute only the cheap ops between
    # the matmuls and attention): a bool or a string, which OmegaConf types cannot say (checked below).
    activation_checkpointing: Any = MISSING
    # Compile the model with torch.compile.
    compile: bool = MISSING
    # Rows of the LM head processed at once by the fused cross-entropy; null sizes a chunk of logits
    # at ~64 MiB (fastest measured); 0 turns fusion off and materialises the full logits.
    loss_chunk_size: int | None = MISSING
    # The stored parameters (the master weights); `precision` picks the compute dtype. Keep float32 for
    # mixed precision; bfloat16 with precision=bf16 is pure bf16.
    dtype: Dtype = MISSING
    # `auto` picks cuda when available, else cpu.
    device: str = MISSING
    progress_bar: bool = MISSING
    # Write the hf/ export (save_pretrained + tokenizer) when the run ends.
    export_hf: bool = MISSING
    # Steps with a non-finite loss or gradient norm that are skipped (weights unchanged) before the run stops
    # with a DivergenceError; fp16's overflow steps, which its loss scaler skips, do not count.
    max_nonfinite_steps: int = MISSING


@dataclass
class PrecisionConfig:
    name: PrecisionName = MISSING
    # FSDP: dtype of the gradient reduce-scatter (float32 keeps the sums exact as in fp32 training).
    reduce_dtype: Dtype = MISSING
    # fp16: the first loss scale, and the factors and interval of its dynamic adjustment.
    init_scale: float = MISSING
    growth_factor: float = MISSING
    backoff_factor: float = MISSING
    growth_interval: int = MISSING
    # fp16: a step that overflows with the scale at or below this stops the run (fp16 cannot represent
    # the gradients: switch to bf16).
    min_loss_scale: float = MISSING
    # fp8: torchao's scaling recipe of the float8 linears.
    fp8_recipe: Fp8Recipe = MISSING
    # fp8 under fsdp with the tensorwise recipe: all-gather the linears' weights in float8.
    fp8_all_gather: bool = MISSING


@dataclass
class CheckpointConfig:
    # Save every N steps; 0 saves only at the end.
    every_steps: int = MISSING
    # Complete checkpoints to keep (oldest removed first); 0 keeps all.
    keep_last: int = MISSING
    # Save a checkpoint when training ends.
    at_end: bool = MISSING


@dataclass
class MetricsConfig:
    # Peak FLOP/s of one device for MFU; null measures it (CPU matmul probe) or looks it up (known GPUs).
    peak_flops: float | None = MISSING


@dataclass
class WandbConfig:
    mode: WandbMode = MISSING
    project: str = MISSING
    # Team or user; null is the account's default.
    entity: str | None = MISSING
    # Run name; null uses the run directory's name.
    name: str | None = MISSING
    tags: list[str] = MISSING


@dataclass
class LoggerConfig:
    # Weights & Biases from rank 0 (extra `wandb`); mode=disabled does not import it.
    wandb: WandbConfig = field(default_factory=WandbConfig)
    # TensorBoard event files in tensorboard/ of the run directory (extra `wandb`).
    tensorboard: bool = MISSING


@dataclass
class Config:
    # The groups (model ... precision, logger ... distill) are options picked by conf/config.yaml's defaults
    # list; train, checkpoint, metrics, profile and resume are set in conf/config.yaml itself. The order is the
    # order of `--cfg job` and .hydra/config.yaml.
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    optimizer: OptimizerConfig = MISSING
    scheduler: SchedulerConfig = MISSING
    strategy: StrategyConfig = MISSING
    precision: PrecisionConfig = MISSING
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    logger: LoggerConfig = MISSING
    quant: QuantConfig = MISSING
    prune: PruneConfig = MISSING
    distill: DistillConfig = MISSING
    peft: PeftConfig = MISSING
    # null (not given: start fresh, refusing a run directory that holds checkpoints), `none` (start fresh
    # anyway), `auto` (latest checkpoint of the run directory, if any) or a checkpoint directory.
    resume: str | None = MISSING


def register_configs() -> None:
    """trainer.train's schemas: the root and every group of conf/config.yaml."""
    register_package_resolver()
    cs = ConfigStore.instance()
    cs.store(name="schema", node=Config)
    cs.store(group="model", name="schema", node=ModelConfig)
    register_optimizer_configs()
    register_strategy_configs()
    cs.store(group="precision", name="schema", node=PrecisionConfig)
    cs.store(group="logger", name="schema", node=LoggerConfig)
    register_data_configs()
    register_quant_configs()
    register_prune_configs()
    register_distill_configs()
    register_peft_configs()


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate_config(cfg: Any, *, world_size: int = 1) -> int:
    """Check the values that types cannot, group by group; returns the gradient-accumulation steps."""
    check_known_keys(cfg)
    _validate_train(cfg.train)
    validate_optimizer(cfg.optimizer)
    validate_scheduler(cfg.scheduler, max_steps=cfg.train.max_steps)
    validate_data(cfg.data)
    _validate_model(cfg.model)
    _validate_precision(cfg.precision)
    validate_strategy(cfg.strategy)
    validate_fp8_all_gather(cfg)
    _validate_checkpoint(cfg.checkpoint)
    validate_profile(cfg.profile, max_steps=cfg.train.max_steps)
    if cfg.get("quant") is not None and cfg.quant.name != "none":
        check_qat_installed()  # torchao, only when QAT is asked for
        validate_quant(cfg)
    validate_prune(cfg)
    validate_distill(cfg.distill)
    validate_peft(cfg)
    t = cfg.train
    per_step = t.micro_batch_size * world_size
    # The same global batch on these ranks: the largest micro-batch (up to the asked one) that divides it.
    keeps = [
        m
        for m in range(min(t.micro_batch_size, t.global_batch_size), 0, -1)
        if t.global_batch_size % (m * world_size) == 0
    ]
    _check(
        t.global_batch_size % per_step == 0,
        f"train.global_batch_size={t.global_batch_size} is not divisible by train.micro_batch_size="
        f"{t.micro_batch_size} x world size {world_size} = {per_step}; pick a global batch that is a multiple of {per_step}"
        + (f", or keep it with train.micro_batch_size={keeps[0]}" if keeps else ""),
    )
    return t.global_batch_size // per_step


def check_known_keys(cfg: Any, *, path: str = "") -> None:
    """Refuse a key that no schema has. Hydra lets `+key=value` add a key anywhere, even under a typed node;
    only a free-form field (typed as a dict or Any in its schema: model.arch, data.markov, strategy.deepspeed,
    prune.layer_sparsity) takes keys of the user's choosing, so a misspelt `+train.max_step=10` is not ignored."""
    if not isinstance(cfg, DictConfig):
        return
    schema = OmegaConf.get_type(cfg)
    if not dataclasses.is_dataclass(schema):
        return  # a free-form field
    known = {f.name for f in dataclasses.fields(schema)}
    for key in cfg:
        name = f"{path}{key}"
        _check(
            key in known,
            f"{name}: no such key in the {path.rstrip('.') or 'top-level'} config (added with `+`?); check the "
            "spelling against `python -m trainer.train --cfg job`. Keys of one's own choosing go under a "
            "free-form field only: model.arch (the transformers config), data.markov, strategy.deepspeed, "
            "prune.layer_sparsity",
        )
        check_known_keys(cfg._get_node(key), path=f"{name}.")


def _validate_train(t: Any) -> None:
    # max_steps=0 is a run that only builds, prunes or cuts the model, evaluates it and exports it.
    _check(
        t.max_steps >= 0,
        f"train.max_steps={t.max_steps}: must be >= 0 (0: prepare, evaluate and export only)",
    )
    for key in ("micro_batch_size", "global_batch_size", "log_every"):
        value = getattr(t, key)
        _check(value > 0, f"train.{key}={value}: must be a positive integer, e.g. train.{key}=8")
    _check(t.eval_every >= 0, f"train.eval_every={t.eval_every}: must be >= 0 (0 evaluates only at the end)")
    _check(
        t.eval_batches >= 0,
        f"train.eval_batches={t.eval_batches}: must be >= 0 (0 uses the whole eval split)",
    )
    _check(
        is_valid_mode(t.activation_checkpointing),
        f"train.activation_checkpointing={t.activation_checkpointing}: must be false, true (recompute each block "
        "in the backward) or selective (keep the matmul and attention outputs, recompute the ops between them)",
    )
    _check(t.grad_clip >= 0, f"train.grad_clip={t.grad_clip}: must be >= 0 (0 disables clipping)")
    _check(
        t.loss_chunk_size is None or t.loss_chunk_size >= 0,
        f"train.loss_chunk_size={t.loss_chunk_size}: must be >= 0 or null",
    )
    _check(
        t.max_nonfinite_steps >= 0,
        f"train.max_nonfinite_steps={t.max_nonfinite_steps}: must be >= 0 (0 stops at the first non-finite step)",
    )


def _validate_model(m: Any) -> None:
    _check(
        m.source != "pretrained" or bool(m.name_or_path),
        "model.source=pretrained needs model.name_or_path (a hub name or a local directory)",
    )


def _validate_precision(pr: Any) -> None:
    _check(
        pr.init_scale > 0 and pr.growth_factor > 1 and 0 < pr.backoff_factor < 1 and pr.growth_interval > 0,
        "precision: init_scale > 0, growth_factor > 1, 0 < backoff_factor < 1 and growth_interval > 0 are needed",
    )
    _check(
        0 < pr.min_loss_scale <= pr.init_scale,
        f"precision.min_loss_scale={pr.min_loss_scale}: must be > 0 and <= precision.init_scale",
    )


def _validate_checkpoint(c: Any) -> None:
    _check(c.every_steps >= 0, f"checkpoint.every_steps={c.every_steps}: must be >= 0")
    _check(c.keep_last >= 0, f"checkpoint.keep_last={c.keep_last}: must be >= 0")
