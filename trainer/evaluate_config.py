"""trainer.evaluate's schema (conf/evaluate.yaml). Beside the command, as each command's schema is, in a
module that imports only Hydra, trainer.choices and the data group's schema: registering or composing it (tests, the pipeline's stages)
needs no model code, and nothing of training's (no prune, distill or QAT schema).
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
    batch_size: int = 1
    # Prompt tokens of the prefill forward.
    prefill_len: int = 128
    # Tokens generated one at a time after the prefill (with the KV cache).
    decode_tokens: int = 32
    # Untimed runs first, then timed repeats.
    warmup: int = 1
    repeats: int = 3
    statistic: LatencyStatistic = LatencyStatistic.median
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
    # dtype the float (unquantized) models run in (on a GPU, compare quantized models with the
    # half-precision float model they replace).
    float_dtype: Dtype = Dtype.float32
    threads: int | None = None
    # Display names of the entries, one per model in `models` order; null: the model directory's name.
    names: list[str] | None = None
    # Keep the entries of an existing `output` measured with the same path, name and settings.
    resume: bool = False


def register_evaluate_configs() -> None:
    ConfigStore.instance().store(name="schema_evaluate", node=EvaluateConfig)
    register_data_configs()
