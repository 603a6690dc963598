"""Post-training quantization: `python -m trainer.quantize model_path=DIR scheme=SCHEME output_dir=OUT`.

Loads the float model (an hf/ export, a checkpoint or a .gguf file), quantizes it with the scheme
(trainer/quant/ptq.py), and saves a model that `trainer.evaluate` and `trainer.quant.load_quantized`
reload and run. int8_smooth calibrates on the training sequences of the configured data group.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from trainer.calibration import data_calibration_batches
from trainer.cli import run
from trainer.data.prepared import Batch
from trainer.errors import InputNotFoundError
from trainer.quant.config import register_quantize_configs, validate_quantize
from trainer.quant.ptq import check_scheme, default_keep_float, quantize_model, scheme_dtype
from trainer.quant.serialization import float_source, load_float, save_quantized, weights_size
from trainer.utils import check_output_dir, register_package_resolver, resolve_device

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
register_quantize_configs()  # its own schemas only: quantizing imports nothing of training's
register_package_resolver()


def check_quantize_config(cfg: Any) -> torch.device:
    """Everything that can be checked before loading a model; returns the device."""
    device = resolve_device(cfg.device, key="device")
    check_scheme(cfg.scheme, device)
    scheme_dtype(cfg.scheme, cfg.dtype)
    validate_quantize(cfg)
    if not Path(cfg.model_path).exists():
        raise InputNotFoundError(
            f"model_path={cfg.model_path}: no such file or directory; give a run's hf/ export, one of its "
            "checkpoints/step_XXXXXXXX directories or a .gguf file"
        )
    # output_dir is replaced when it exists: never the model read, nor a directory holding it
    check_output_dir("output_dir", cfg.output_dir, source=cfg.model_path)
    return device


def calibration_batches(cfg: Any, tokenizer_dir: str) -> list[Batch]:
    """The first smooth.calibration_batches x smooth.batch_size training sequences of the data group, tokenized
    with the model's own tokenizer (with their documents' position ids where the data packs several)."""
    s = cfg.smooth
    return data_calibration_batches(
        cfg.data, tokenizer=tokenizer_dir, num_batches=s.calibration_batches, batch_size=s.batch_size
    )


def quantize(cfg: Any) -> Path:
    device = check_quantize_config(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    start = time.perf_counter()
    with float_source(cfg.model_path) as (directory, gguf_file):
        model, tokenizer = load_float(directory, gguf_file)
        float_size = weights_size(Path(directory) / gguf_file if gguf_file else Path(directory))
        calibration = calibration_batches(cfg, directory) if cfg.scheme == "int8_smooth" else []
    model.to(device)
    info = quantize_model(
        model,
        cfg.scheme,
        keep_float=list(cfg.keep_float) if cfg.keep_float is not None else default_keep_float(cfg.scheme),
        group_size=cfg.group_size,
        calibration=calibration,
        alpha=cfg.smooth.alpha,
        gptq=cfg.smooth.gptq,
        dtype=cfg.dtype,
    )
    info["source"] = str(cfg.model_path)
    out = save_quantized(Path(cfg.output_dir), model, info, tokenizer)
    size = weights_size(out)
    print(
        f"quantized {cfg.model_path} with {cfg.scheme} in {time.perf_counter() - start:.1f}s: "
        f"{size / 1e6:.2f} MB on disk ({size / max(float_size, 1):.2f}x the float {float_size / 1e6:.2f} MB) -> {out}",
        flush=True,
    )
    return out


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="quantize")
def main(cfg: DictConfig) -> None:
    quantize(cfg)


if __name__ == "__main__":
    run(main)
