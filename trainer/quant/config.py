"""Quantization's schemas and the checks their types cannot express: the quant group of training (QAT,
conf/quant/*.yaml) and trainer.quantize's config (PTQ, conf/quantize.yaml).

Every default lives in the YAML, which sets every key (tests/test_config.py checks both). That QAT's package
is installed is checked by trainer.quant.qat, beside the code that imports it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from trainer.choices import Choice, Dtype, PrecisionName
from trainer.data.config import DataConfig, register_data_configs
from trainer.errors import ConfigError

# Quantization-aware training (torchao fake quantization in the loop; the hf/ export is converted to a real
# quantized model in quantized/).
QatScheme = Choice("QatScheme", "none int8_dynamic int8_weight int4_weight")
# Post-training quantization (trainer/quant/ptq.py); int4_weight and sparse24 need CUDA.
QuantScheme = Choice("QuantScheme", "int8_dynamic int8_smooth int8_weight int4_weight sparse24")


@dataclass
class QuantConfig:
    name: QatScheme = MISSING
    # Linear layers whose names contain one of these stay in float (the LM head always does).
    keep_float: list[str] = MISSING
    # int4_weight: weights per quantization group along a row.
    group_size: int = MISSING


def register_quant_configs() -> None:
    ConfigStore.instance().store(group="quant", name="schema", node=QuantConfig)


def validate_quant(cfg: Any) -> None:
    """Refuse what QAT cannot do, before any work (cfg is the whole run config). What depends on the strategy is
    asked of it when the QAT extension is made (trainer/quant/qat.py)."""
    q = cfg.quant
    if q.name is QatScheme.none:
        return
    if cfg.precision.name is PrecisionName.fp8:
        raise ConfigError(
            f"quant={q.name} and precision=fp8 both replace the linear layers; use precision=fp32 or bf16 with QAT"
        )
    if not cfg.train.export_hf:
        raise ConfigError(
            f"quant={q.name} converts the final hf/ export into quantized/; set train.export_hf=true"
        )
    if q.name is QatScheme.int4_weight and q.group_size <= 0:
        raise ConfigError(f"quant.group_size={q.group_size}: must be > 0, e.g. 32")


@dataclass
class SmoothConfig:
    # SmoothQuant migration strength: null searches it per group of layers (lowest int8 error on the
    # calibration data); a number in [0, 1] applies it everywhere.
    alpha: float | None = MISSING
    # Calibration batches (of `batch_size` training sequences of the data group) for the activation ranges.
    calibration_batches: int = MISSING
    batch_size: int = MISSING
    # Round the blocks' int8 weights with GPTQ (error spread over the columns not yet rounded, from the
    # calibration inputs) rather than to nearest.
    gptq: bool = MISSING


@dataclass
class QuantizeConfig:
    # An hf/ export, a checkpoints/step_XXXXXXXX directory or a .gguf file.
    model_path: str = MISSING
    scheme: QuantScheme = MISSING
    # Directory to write the quantized model into (replaced if it exists).
    output_dir: str = MISSING
    # `auto` (cuda when available), `cpu` or `cuda`.
    device: str = MISSING
    # Linear layers whose names contain one of these stay in float; None: the scheme's default
    # (`[lm_head]`, or `[]` for int8_smooth, which smooths the head and rounds it by GPTQ).
    keep_float: list[str] | None = MISSING
    # int4_weight: weights per quantization group.
    group_size: int = MISSING
    # dtype of the float parts (activations, layers kept in float); None: the scheme's (float32; int4_weight
    # bfloat16; sparse24 float16). A GPU runs the int8 schemes fastest in bfloat16.
    dtype: Dtype | None = MISSING
    smooth: SmoothConfig = field(default_factory=SmoothConfig)
    # The calibration data (int8_smooth): the same data group as training.
    data: DataConfig = MISSING
    # Threads for torch on the CPU (null: torch's default).
    threads: int | None = MISSING


def register_quantize_configs() -> None:
    """trainer.quantize's schemas, and nothing of training's."""
    ConfigStore.instance().store(name="schema_quantize", node=QuantizeConfig)
    register_data_configs()


def validate_quantize(cfg: Any) -> None:
    """trainer.quantize's values that need neither the device nor the model."""
    s = cfg.smooth
    if s.alpha is not None and not 0.0 <= s.alpha <= 1.0:
        raise ConfigError(f"smooth.alpha={s.alpha}: must be in [0, 1], or null to search it")
    if s.calibration_batches < 1 or s.batch_size < 1:
        raise ConfigError("smooth.calibration_batches and smooth.batch_size must be >= 1")
    if cfg.group_size < 1:
        raise ConfigError(f"group_size={cfg.group_size}: must be >= 1, e.g. 128")
