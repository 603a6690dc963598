"""trainer.evaluate's schema (conf/evaluate.yaml). Beside the command, as each command's schema is, in a
module that imports only Hydra, trainer.choices and the data group's schema: registering or composing it (tests, the pipeline's stages)
needs no model code, and nothing of training's (no prune, distill or QAT schema).

Every default lives in conf/evaluate.yaml, which sets every key (tests/test_config.py checks both).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from trainer.choices import Choice, Dtype
from trainer.data.config import DataConfig, register_data_configs

# What is reported of the timed repeats: `median`, or `best` (the fastest: on a shared or virtual machine the
# one least disturbed by other work).
LatencyStatistic = Choice("LatencyStatistic", "median best")


@dataclass
class LatencyConfig:
    # Sequences per forward for the latency measurements.
    batch_size: int = MISSING
    # Prompt tokens of the prefill forward.
    prefill_len: int = MISSING
    # Tokens generated one at a time after the prefill (with the KV cache).
    decode_tokens: int = MISSING
    # Untimed runs first, then timed repeats.
    warmup: int = MISSING
    repeats: int = MISSING
    statistic: LatencyStatistic = MISSING
    # Time the models in turns (every model once per round, after all perplexities) so that a slow spell
    # of a shared machine slows every model alike; holds every model in memory at once.
    interleave: bool = MISSING


@dataclass
class LmEvalConfig:
    # Examples in each task's prompt; null: each task's own default.
    num_fewshot: int | None = MISSING
    # Examples per task (a quick look); null: all of them.
    limit: int | None = MISSING
    # Requests per forward.
    batch_size: int = MISSING
    # A directory of the user's own task YAMLs (lm-eval's format), found beside lm-eval's own tasks.
    include_path: str | None = MISSING
    # Seed of Python's, numpy's and torch's generators and of the few-shot sampling.
    seed: int = MISSING


@dataclass
class EvaluateConfig:
    # Model paths: hf/ exports, checkpoints, trainer.quantize outputs, trainer.export outputs (a .gguf file or a
    # directory holding one, a compressed-tensors directory), adapter/ directories (merged into their base).
    models: list[str] = MISSING
    # JSON file to write (one entry per model).
    output: str = MISSING
    # Perplexity on the eval split of this data group (as in training); the tokenizer is the first model's.
    data: DataConfig = MISSING
    # Sequences per forward for perplexity.
    batch_size: int = MISSING
    # Batches of the eval split for perplexity; 0 uses all of it.
    eval_batches: int = MISSING
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    # `auto` (cuda when available), `cpu` or `cuda`; int8_smooth models run on the CPU.
    device: str = MISSING
    # dtype the float (unquantized) models run in (on a GPU, compare quantized models with the
    # half-precision float model they replace).
    float_dtype: Dtype = MISSING
    threads: int | None = MISSING
    # Display names of the entries, one per model in `models` order; null: the model directory's name.
    names: list[str] | None = MISSING
    # Keep the entries of an existing `output` measured with the same path, name and settings.
    resume: bool = MISSING
    # lm-evaluation-harness tasks run on each model (the `eval` extra); empty: none.
    tasks: list[str] = MISSING
    lm_eval: LmEvalConfig = field(default_factory=LmEvalConfig)


def register_evaluate_configs() -> None:
    ConfigStore.instance().store(name="schema_evaluate", node=EvaluateConfig)
    register_data_configs()
