"""Structured config schemas, registered with Hydra so that a typo or a bad value fails before any work starts.

Every YAML under `conf/` is merged onto these dataclasses: an unknown key, a wrong type or a missing
required value is a Hydra error at start-up. `validate_config` adds the checks types cannot express
(positive sizes, divisibility), each with a message that names the key and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key and the fix."""


@dataclass
class ModelConfig:
    # `config`: build a fresh model from `arch` (random init); `pretrained`: load weights from `name_or_path`.
    source: str = "config"
    # HF hub name or local directory (weights for `pretrained`, an AutoConfig for `config` when `arch` is empty).
    name_or_path: str | None = None
    # GGUF file inside `name_or_path` (needs the `gguf` extra).
    gguf_file: str | None = None
    # Architecture fields passed to the transformers config class (`model_type` picks the class).
    arch: dict[str, Any] = field(default_factory=dict)
    # Run model code from the hub; off unless asked for, since it executes downloaded Python.
    trust_remote_code: bool = False


@dataclass
class DataConfig:
    # `embedded` (generated Markov corpus), `pydoc` (CPython's pydoc topics), `hf` (hub dataset or local files).
    source: str = MISSING
    # Hub dataset name, or a builder (`json`, `parquet`, `text`) for local files; inferred from `data_files` when null.
    path: str | None = None
    # Dataset configuration name on the hub.
    name: str | None = None
    # Local files (a path, a glob, or a list), loaded with the builder their extension names.
    data_files: Any = None
    # Column holding the text.
    text_field: str = "text"
    train_split: str = "train"
    # Split used for evaluation; when null (or absent), `eval_fraction` of the train documents is held out.
    eval_split: str | None = None
    # Fraction of documents held out for evaluation when there is no eval split.
    eval_fraction: float = 0.05
    # Tokens per training sequence.
    seq_len: int = 256
    # Concatenate documents (separated by EOS) into full windows; false pads each document to seq_len.
    packing: bool = True
    # `wordlevel` or `bpe` build a tokenizer from the train split and save it with the run;
    # anything else is an AutoTokenizer name or path; null uses the model's own.
    tokenizer: str | None = None
    # Vocabulary size for a built `bpe` tokenizer.
    tokenizer_vocab_size: int = 8192
    # Settings of the embedded Markov source (ignored by other sources).
    markov: dict[str, Any] = field(default_factory=dict)
    # Where generated corpora are written (relative paths are inside the run directory).
    cache_dir: str = "data"
    # Processes used to tokenize.
    num_proc: int = 1


@dataclass
class OptimizerConfig:
    # Class to build, any optimizer with the torch interface.
    _target_: str = MISSING
    lr: float = MISSING
    weight_decay: float = 0.0
    # Parameters whose names contain one of these get no weight decay (biases, norms, embeddings).
    no_decay: list[str] = field(default_factory=lambda: ["bias", "norm", "embed"])


@dataclass
class AdamWConfig(OptimizerConfig):
    _target_: str = "torch.optim.AdamW"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    # Multi-tensor kernels; `fused` is chosen instead on CUDA.
    foreach: bool | None = None


@dataclass
class SGDConfig(OptimizerConfig):
    _target_: str = "torch.optim.SGD"
    momentum: float = 0.9
    nesterov: bool = False


@dataclass
class LionConfig(OptimizerConfig):
    _target_: str = "trainer.optimizers.Lion"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    foreach: bool | None = None


@dataclass
class AdafactorConfig(OptimizerConfig):
    _target_: str = "torch.optim.Adafactor"
    # Exponent of the second-moment decay schedule, beta2_t = 1 - t^beta2_decay.
    beta2_decay: float = -0.8
    # (eps1, eps2): the second-moment floor (null: the dtype's eps) and the floor of a parameter's RMS.
    eps: list[float | None] = field(default_factory=lambda: [None, 1e-3])
    # Clipping threshold of the update's RMS.
    d: float = 1.0
    foreach: bool | None = None


@dataclass
class ApexAdamConfig(OptimizerConfig):
    _target_: str = "apex.optimizers.FusedAdam"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    bias_correction: bool = True
    # Decoupled weight decay (AdamW); false adds it to the gradient (Adam with L2).
    adam_w_mode: bool = True


@dataclass
class ApexLAMBConfig(OptimizerConfig):
    _target_: str = "apex.optimizers.FusedLAMB"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-6
    bias_correction: bool = True
    adam_w_mode: bool = True
    # LAMB's own clipping of the global gradient norm, after train.grad_clip.
    max_grad_norm: float = 1.0
    # NVLAMB: the trust ratio also for parameters without weight decay.
    use_nvlamb: bool = False


@dataclass
class DeepSpeedAdamConfig(OptimizerConfig):
    # DeepSpeedCPUAdam replaces it when ZeRO offloads the optimizer (strategy.offload_optimizer=cpu).
    _target_: str = "deepspeed.ops.adam.FusedAdam"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    bias_correction: bool = True


@dataclass
class AdamW8bitConfig(OptimizerConfig):
    _target_: str = "bitsandbytes.optim.AdamW8bit"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    # Tensors with fewer elements keep 32-bit states.
    min_8bit_size: int = 4096


@dataclass
class SchedulerConfig:
    # `constant`, `linear`, `cosine` or `wsd`, after a linear warmup.
    name: str = MISSING
    warmup_steps: int = 0
    # Steps over which the decay runs; null means train.max_steps (set it to extend a run explicitly).
    decay_steps: int | None = None
    # Final learning rate as a fraction of the peak.
    min_lr_ratio: float = 0.0


@dataclass
class WSDSchedulerConfig(SchedulerConfig):
    # Warmup-stable-decay: the peak holds until the last `decay_fraction` of the decay_steps horizon.
    name: str = "wsd"
    decay_fraction: float = 0.2
    # Shape of the final decay: `linear`, `cosine` or `1-sqrt`.
    decay_shape: str = "1-sqrt"


@dataclass
class StrategyConfig:
    # `single`, `ddp`, `fsdp`, `zero1`, `zero2` or `zero3`.
    name: str = "single"
    # Process group backend; null picks nccl on CUDA, gloo on CPU.
    backend: str | None = None
    # FSDP: free each block's gathered parameters after its forward (re-gather in backward).
    reshard_after_forward: bool = True
    # FSDP: keep sharded parameters, gradients and optimizer states in CPU memory.
    cpu_offload: bool = False
    # FSDP: hold unsharded gradients over the micro-batches and reduce-scatter once at the last (less
    # communication, a whole gradient per rank); false reduce-scatters every micro-batch (sharded gradients).
    defer_grad_sync: bool = False
    # FSDP: replica groups; > 1 gives HSDP (shard within world/replicate ranks, replicate across groups).
    replicate_degree: int = 1
    # ZeRO: `none` or `cpu` for the optimizer states (and step), DeepSpeed's CPU offload.
    offload_optimizer: str = "none"
    # ZeRO-3: `none` or `cpu` for the parameters.
    offload_params: str = "none"
    # ZeRO: extra DeepSpeed config keys merged over the generated config (e.g. {zero_optimization: {...}});
    # null for none. Typed Any so that `strategy.deepspeed={...}` can bring keys the schema does not know.
    deepspeed: Any = None


@dataclass
class TrainConfig:
    max_steps: int = 200
    # Sequences per rank per forward/backward.
    micro_batch_size: int = 8
    # Sequences per optimizer step over all ranks; accumulation = global / (micro x world).
    global_batch_size: int = 8
    seed: int = 1234
    # Gradient clipping by global norm; 0 disables clipping (the norm is still logged).
    grad_clip: float = 1.0
    log_every: int = 10
    # 0 evaluates only at the end.
    eval_every: int = 100
    # Eval batches (of micro_batch_size) per evaluation; 0 uses the whole eval split.
    eval_batches: int = 0
    # Recompute activations in the backward pass to save memory.
    activation_checkpointing: bool = False
    # Compile the model with torch.compile.
    compile: bool = False
    # Rows of the LM head processed at once by the fused cross-entropy; null sizes a chunk of logits
    # at ~64 MiB (fastest measured); 0 turns fusion off and materialises the full logits.
    loss_chunk_size: int | None = None
    # `float32`, `bfloat16` or `float16` for the stored parameters (the master weights); `precision` picks
    # the compute dtype. Keep float32 for mixed precision; bfloat16 with precision=bf16 is pure bf16.
    dtype: str = "float32"
    # `auto` picks cuda when available, else cpu.
    device: str = "auto"
    progress_bar: bool = True
    # Write the hf/ export (save_pretrained + tokenizer) when the run ends.
    export_hf: bool = True


@dataclass
class PrecisionConfig:
    # `fp32`, `bf16`, `fp16` (dynamic loss scaling) or `fp8` (torchao float8 linears, bf16 elsewhere; GPUs
    # with compute capability 8.9+).
    name: str = "fp32"
    # FSDP: dtype of the gradient reduce-scatter (float32 keeps the sums exact as in fp32 training).
    reduce_dtype: str = "float32"
    # fp16: the first loss scale, and the factors and interval of its dynamic adjustment.
    init_scale: float = 65536.0
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000
    # fp16: a step that overflows with the scale at or below this stops the run (fp16 cannot represent
    # the gradients: switch to bf16).
    min_loss_scale: float = 1.0


@dataclass
class CheckpointConfig:
    # Save every N steps; 0 saves only at the end.
    every_steps: int = 0
    # Complete checkpoints to keep (oldest removed first); 0 keeps all.
    keep_last: int = 2
    # Save a checkpoint when training ends.
    at_end: bool = True


@dataclass
class MetricsConfig:
    # Peak FLOP/s of one device for MFU; null measures it (CPU matmul probe) or looks it up (known GPUs).
    peak_flops: float | None = None


@dataclass
class DistillConfig:
    # `none` (plain training) or `kd` (teacher -> student distillation).
    name: str = "none"
    # The teacher: a HF hub name or directory (an `hf/` export too), or one of our checkpoints
    # (a checkpoints/step_XXXXXXXX directory, its `latest` file, or a run directory).
    teacher: str | None = None
    # GGUF file inside `teacher` (needs the `gguf` extra).
    teacher_gguf_file: str | None = None
    # `forward_kl`, `reverse_kl`, `jsd` or `tvd` between the tempered next-token distributions.
    loss: str = "forward_kl"
    # Softens both distributions (logits / T); every loss is multiplied by T^2.
    temperature: float = 1.0
    # Weight of the distillation term: loss = (1 - alpha) * cross-entropy + alpha * distillation + hidden.
    alpha: float = 0.5
    # jsd: weight of the teacher in the mixture m = beta * teacher + (1 - beta) * student, in (0, 1).
    beta: float = 0.5
    # Weight of the hidden-state term (0 turns it off).
    hidden_weight: float = 0.0
    # `mse` or `cosine` between (projected) student and teacher hidden states.
    hidden_loss: str = "mse"
    # Teacher layer (1-based) for each student layer, in order; null spreads them evenly (last to last).
    layer_map: list[int] | None = None
    # Rows of logits per chunk of the distillation loss; null sizes a chunk at ~64 MiB of logits, 0 all at once.
    chunk_size: int | None = None
    # `model`: the student is what the model group builds or loads; `teacher_layers`: the teacher's
    # architecture with every `student_layer_stride`-th layer kept, initialised from those layers.
    student_init: str = "model"
    student_layer_stride: int = 2


@dataclass
class Config:
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    optimizer: OptimizerConfig = MISSING
    scheduler: SchedulerConfig = MISSING
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    # `none`, `auto` (latest checkpoint of the run directory, if any) or a checkpoint directory.
    resume: str = "none"


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="schema", node=Config)
    cs.store(group="model", name="schema", node=ModelConfig)
    cs.store(group="data", name="schema", node=DataConfig)
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
    cs.store(group="strategy", name="schema", node=StrategyConfig)
    cs.store(group="precision", name="schema", node=PrecisionConfig)
    cs.store(group="distill", name="schema", node=DistillConfig)


SCHEDULERS = ("constant", "linear", "cosine", "wsd")
DECAY_SHAPES = ("linear", "cosine", "1-sqrt")
DATA_SOURCES = ("embedded", "pydoc", "hf")
MODEL_SOURCES = ("config", "pretrained")
DTYPES = ("float32", "bfloat16", "float16")
STRATEGIES = ("single", "ddp", "fsdp", "zero1", "zero2", "zero3")
PRECISIONS = ("fp32", "bf16", "fp16", "fp8")
DISTILL_LOSSES = ("forward_kl", "reverse_kl", "jsd", "tvd")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate_config(cfg: Any, *, world_size: int = 1) -> int:
    """Check the values that types cannot; returns the gradient-accumulation steps."""
    t = cfg.train
    for key in ("max_steps", "micro_batch_size", "global_batch_size", "log_every"):
        value = getattr(t, key)
        _check(value > 0, f"train.{key}={value}: must be a positive integer, e.g. train.{key}=8")
    _check(t.eval_every >= 0, f"train.eval_every={t.eval_every}: must be >= 0 (0 evaluates only at the end)")
    _check(
        t.eval_batches >= 0,
        f"train.eval_batches={t.eval_batches}: must be >= 0 (0 uses the whole eval split)",
    )
    _check(t.grad_clip >= 0, f"train.grad_clip={t.grad_clip}: must be >= 0 (0 disables clipping)")
    _check(
        t.loss_chunk_size is None or t.loss_chunk_size >= 0,
        f"train.loss_chunk_size={t.loss_chunk_size}: must be >= 0 or null",
    )
    _check(t.dtype in DTYPES, f"train.dtype={t.dtype}: choose one of {', '.join(DTYPES)}")
    _check(
        cfg.optimizer.lr > 0,
        f"optimizer.lr={cfg.optimizer.lr}: the learning rate must be > 0, e.g. optimizer.lr=3e-4",
    )
    _check(
        cfg.optimizer.weight_decay >= 0, f"optimizer.weight_decay={cfg.optimizer.weight_decay}: must be >= 0"
    )
    s = cfg.scheduler
    _check(s.name in SCHEDULERS, f"scheduler.name={s.name}: choose one of {', '.join(SCHEDULERS)}")
    _check(s.warmup_steps >= 0, f"scheduler.warmup_steps={s.warmup_steps}: must be >= 0")
    _check(
        s.decay_steps is None or s.decay_steps > 0,
        f"scheduler.decay_steps={s.decay_steps}: must be > 0 or null",
    )
    _check(0.0 <= s.min_lr_ratio <= 1.0, f"scheduler.min_lr_ratio={s.min_lr_ratio}: must be in [0, 1]")
    if s.name == "wsd":
        fraction, shape = s.get("decay_fraction"), s.get("decay_shape")
        _check(
            fraction is not None and shape is not None,
            "scheduler.name=wsd needs decay_fraction and decay_shape: choose it with scheduler=wsd",
        )
        _check(0.0 < fraction <= 1.0, f"scheduler.decay_fraction={fraction}: must be in (0, 1]")
        _check(
            shape in DECAY_SHAPES, f"scheduler.decay_shape={shape}: choose one of {', '.join(DECAY_SHAPES)}"
        )
    d = cfg.data
    _check(d.source in DATA_SOURCES, f"data.source={d.source}: choose one of {', '.join(DATA_SOURCES)}")
    _check(d.seq_len > 1, f"data.seq_len={d.seq_len}: must be at least 2")
    _check(0.0 < d.eval_fraction < 1.0, f"data.eval_fraction={d.eval_fraction}: must be in (0, 1)")
    _check(
        cfg.model.source in MODEL_SOURCES,
        f"model.source={cfg.model.source}: choose one of {', '.join(MODEL_SOURCES)}",
    )
    _check(
        cfg.model.source != "pretrained" or bool(cfg.model.name_or_path),
        "model.source=pretrained needs model.name_or_path (a hub name or a local directory)",
    )
    _check(
        cfg.strategy.name in STRATEGIES,
        f"strategy.name={cfg.strategy.name}: choose one of {', '.join(STRATEGIES)}",
    )
    pr = cfg.precision
    _check(pr.name in PRECISIONS, f"precision.name={pr.name}: choose one of {', '.join(PRECISIONS)}")
    _check(
        pr.reduce_dtype in DTYPES,
        f"precision.reduce_dtype={pr.reduce_dtype}: choose one of {', '.join(DTYPES)}",
    )
    _check(
        pr.init_scale > 0 and pr.growth_factor > 1 and 0 < pr.backoff_factor < 1 and pr.growth_interval > 0,
        "precision: init_scale > 0, growth_factor > 1, 0 < backoff_factor < 1 and growth_interval > 0 are needed",
    )
    _check(
        0 < pr.min_loss_scale <= pr.init_scale,
        f"precision.min_loss_scale={pr.min_loss_scale}: must be > 0 and <= precision.init_scale",
    )
    extra = cfg.strategy.deepspeed
    _check(
        extra is None or (OmegaConf.is_dict(extra) or isinstance(extra, dict)),
        f"strategy.deepspeed={extra}: must be a mapping of DeepSpeed keys, e.g. "
        "'strategy.deepspeed={zero_optimization: {reduce_bucket_size: 50000000}}'",
    )
    _check(
        extra is None or cfg.strategy.name.startswith("zero"),
        f"strategy.deepspeed is set but strategy={cfg.strategy.name} does not run DeepSpeed; "
        "use strategy=zero1, zero2 or zero3, or drop strategy.deepspeed",
    )
    _check(
        cfg.checkpoint.every_steps >= 0, f"checkpoint.every_steps={cfg.checkpoint.every_steps}: must be >= 0"
    )
    _check(cfg.checkpoint.keep_last >= 0, f"checkpoint.keep_last={cfg.checkpoint.keep_last}: must be >= 0")
    _validate_distill(cfg.distill)
    per_step = t.micro_batch_size * world_size
    _check(
        t.global_batch_size % per_step == 0,
        f"train.global_batch_size={t.global_batch_size} is not divisible by train.micro_batch_size="
        f"{t.micro_batch_size} x world size {world_size} = {per_step}; pick a global batch that is a multiple of {per_step}",
    )
    return t.global_batch_size // per_step


def _validate_distill(d: Any) -> None:
    _check(d.name in ("none", "kd"), f"distill.name={d.name}: choose none or kd (distill=kd)")
    if d.name == "none":
        return
    _check(
        bool(d.teacher), "distill=kd needs distill.teacher: a HF name or directory, or a checkpoint of ours"
    )
    _check(d.loss in DISTILL_LOSSES, f"distill.loss={d.loss}: choose one of {', '.join(DISTILL_LOSSES)}")
    _check(
        d.temperature > 0,
        f"distill.temperature={d.temperature}: must be > 0 (1 leaves the logits as they are)",
    )
    _check(
        0.0 <= d.alpha <= 1.0, f"distill.alpha={d.alpha}: must be in [0, 1] (the distillation term's weight)"
    )
    _check(0.0 < d.beta < 1.0, f"distill.beta={d.beta}: must be in (0, 1) (0 and 1 make the JSD vanish)")
    _check(d.hidden_weight >= 0, f"distill.hidden_weight={d.hidden_weight}: must be >= 0 (0 turns it off)")
    _check(d.hidden_loss in ("mse", "cosine"), f"distill.hidden_loss={d.hidden_loss}: choose mse or cosine")
    _check(
        d.chunk_size is None or d.chunk_size >= 0, f"distill.chunk_size={d.chunk_size}: must be >= 0 or null"
    )
    _check(
        d.student_init in ("model", "teacher_layers"),
        f"distill.student_init={d.student_init}: choose model or teacher_layers",
    )
    _check(
        d.student_layer_stride >= 1,
        f"distill.student_layer_stride={d.student_layer_stride}: must be >= 1 (keep every k-th teacher layer)",
    )
