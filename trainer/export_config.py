"""trainer.export's schema (conf/export.yaml). Beside the command, as each command's schema is, in a module
that imports only Hydra, trainer.choices, trainer.errors and the data group's schema: registering or
composing it needs no model code and nothing of training's.

Every default lives in conf/export.yaml, which sets every key (tests/test_config.py checks both).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from trainer.choices import CompressedTensorsScheme, ExportFormat, GgufType
from trainer.data.config import DataConfig, register_data_configs
from trainer.errors import ConfigError


@dataclass
class GgufConfig:
    # Tensor type of the matrices; norms and other 1-D tensors stay f32.
    type: GgufType = MISSING
    # Matrices (HF name substrings) kept f16 under q8_0/q4_0; None: [lm_head], as trainer.quantize keeps it.
    keep_float: list[str] | None = MISSING


@dataclass
class CalibrationConfig:
    # Batches of training sequences of the data group handed to the compressed-tensors export.
    batches: int = MISSING
    # Sequences per calibration batch.
    batch_size: int = MISSING


@dataclass
class ExportConfig:
    # An hf/ export, a checkpoints/step_XXXXXXXX directory or a run directory (its latest checkpoint, else hf/).
    model_path: str = MISSING
    format: ExportFormat = MISSING
    # The directory written; refused when it exists and is not empty, unless overwrite.
    output_dir: str = MISSING
    overwrite: bool = MISSING
    gguf: GgufConfig = field(default_factory=GgufConfig)
    # compressed_tensors only, and required there.
    scheme: CompressedTensorsScheme | None = MISSING
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    # Calibration text for compressed_tensors, tokenized with the model's own tokenizer.
    data: DataConfig = MISSING
    # Run the model's own code from the hub (a model.trust_remote_code=true run); never because a stored file says so.
    trust_remote_code: bool = MISSING


def register_export_configs() -> None:
    """trainer.export's schemas, and nothing of training's."""
    ConfigStore.instance().store(name="schema_export", node=ExportConfig)
    register_data_configs()


def validate_export(cfg: Any) -> None:
    """The values that need no model: each option set only for the format that reads it."""
    if cfg.format == "compressed_tensors" and cfg.scheme is None:
        raise ConfigError(
            "format=compressed_tensors needs a scheme: add scheme=w8a16, scheme=w8a8 or scheme=w4a16"
        )
    if cfg.format != "compressed_tensors" and cfg.scheme is not None:
        raise ConfigError(
            f"scheme={cfg.scheme} applies to format=compressed_tensors only (format={cfg.format}); drop it, "
            "or set format=compressed_tensors"
        )
    c = cfg.calibration
    if c.batches < 1 or c.batch_size < 1:
        raise ConfigError("calibration.batches and calibration.batch_size must be >= 1")
