"""Quantization-aware training with torchao's fake-quantize flow, and its conversion at the end.

`quant=int8_dynamic|int8_weight|int4_weight` swaps the model's linear layers (all but the LM head and
those named in `quant.keep_float`) for torchao's FakeQuantizedLinear before the strategy wraps it: the
forward rounds weights (and, for int8_dynamic, activations per token) to the integer grid and the
backward passes gradients straight through. The parameter names do not change, so checkpoints, resume
and the `hf/` export work as without QAT (the export holds the float latent weights).

When training ends, rank 0 converts the `hf/` export with the same torchao config (QATConfig
step="convert") and saves the real quantized model to `quantized/` (see serialization.py). Its outputs
equal those of the fake-quantized model: the same rounding, now on stored integers.

| quant        | torchao base config                                         | converted weights               |
| ------------ | ----------------------------------------------------------- | ------------------------------- |
| int8_dynamic | Int8DynamicActivationIntxWeightConfig(int8, per channel)    | int8 + per-token int8 activations |
| int8_weight  | IntxWeightOnlyConfig(int8, per channel)                     | int8                            |
| int4_weight  | IntxWeightOnlyConfig(int4, groups of quant.group_size)      | int4 values held in int8 (torchao's portable layout; no int4 kernel on CPU) |
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.distributed import barrier
from trainer.errors import ConfigError
from trainer.extensions import Extension
from trainer.models import is_conv1d, layer_types, warn_unhandled_experts
from trainer.utils import require

GROUPED_SCHEMES = ("int4_weight",)  # scales per group of quant.group_size weights along a row


def check_qat_installed() -> None:
    """QAT's package, checked with the config before any work (the config's own checks are
    trainer/quant/config.py's validate_quant)."""
    require("torchao.quantization.qat", extra="quant", package="torchao")


class QAT(Extension):
    """Quantization-aware training as a loop extension: fake-quantized linears before wrapping, and the real
    quantized model converted from the hf/ export when the run ends."""

    name = "quant"

    def __init__(self, q: Any, *, strategy: Any, env: Any) -> None:
        if not strategy.replicated:  # tested under single and ddp, whose ranks hold whole weights
            raise ConfigError(
                f"quant={q.name} (QAT) runs under strategy=single or ddp; {strategy} shards or "
                "partitions the weights that fake quantization reads whole (untested with QAT): use strategy=ddp"
            )
        self.q, self.env = q, env

    def before_wrap(self, model: nn.Module, *, resume: Path | None) -> None:
        prepare_qat(model, self.q)
        if self.env.is_main:
            warn_unhandled_experts(
                model,
                feature=f"quant={self.q.name} (QAT)",
                consequence="they train in float and stay float in quantized/; the linears are fake-quantized",
            )

    def finish(self, run_dir: Path) -> None:
        if self.env.is_main:
            convert_export(run_dir / "hf", run_dir / "quantized", self.q)
        barrier()


def base_config(q: Any) -> Any:
    """The torchao PTQ config the fake quantization imitates and the conversion applies."""
    ao = require("torchao.quantization", extra="quant", package="torchao")
    configs = {
        "int8_dynamic": lambda: ao.Int8DynamicActivationIntxWeightConfig(
            weight_dtype=torch.int8, weight_granularity=ao.PerAxis(0)
        ),
        "int8_weight": lambda: ao.IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=ao.PerAxis(0)),
        "int4_weight": lambda: ao.IntxWeightOnlyConfig(
            weight_dtype=torch.int4, granularity=ao.PerGroup(q.group_size)
        ),
    }
    if str(q.name) not in configs:
        raise ValueError(f"quant.name={q.name} has no torchao config")
    return configs[str(q.name)]()


def _filter(model: nn.Module, keep_float: list[str]):
    """Linear layers except the LM head (the fused loss reads its float weight) and keep_float's."""
    head = model.get_output_embeddings()
    return lambda m, fqn: type(m) is nn.Linear and m is not head and not any(k in fqn for k in keep_float)


def _apply(model: nn.Module, q: Any, step: str) -> None:
    ao = require("torchao.quantization", extra="quant", package="torchao")
    qat = require("torchao.quantization.qat", extra="quant", package="torchao")
    keep = list(q.keep_float)
    if step == "convert":  # FakeQuantizedLinear is what prepare made; leave everything else alone
        head = model.get_output_embeddings()
        filter_fn = lambda m, fqn: type(m).__name__ == "FakeQuantizedLinear" and m is not head  # noqa: E731
    else:
        filter_fn = _filter(model, keep)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ao.quantize_(model, qat.QATConfig(base_config(q), step=step), filter_fn=filter_fn)


def prepare_qat(model: nn.Module, q: Any) -> int:
    """Swap eligible linears for fake-quantized ones in place; returns how many."""
    _apply(model, q, "prepare")
    swapped = sum(type(m).__name__ == "FakeQuantizedLinear" for m in model.modules())
    if swapped == 0:
        conv1d = any(is_conv1d(m) for m in model.modules())
        raise ConfigError(
            f"quant={q.name} (QAT) fake-quantizes nn.Linear layers and finds none in {type(model).__name__} "
            f"outside the LM head and quant.keep_float={list(q.keep_float)} (its layer types: "
            f"{', '.join(layer_types(model))})"
            + (
                "; GPT-2's Conv1D layers are not nn.Linear and QAT does not convert them: train with quant=none "
                "and quantize the hf/ export with trainer.quantize, which does"
                if conv1d
                else "; keep fewer layers in float"
            )
        )
    return swapped


def convert_export(hf_dir: Path, out_dir: Path, q: Any) -> Path:
    """Load the float export of a QAT run, prepare and convert it with torchao, save it quantized."""
    from trainer.quant.serialization import load_float, save_quantized

    model, tokenizer = load_float(str(hf_dir))
    prepare_qat(model, q)
    _apply(model, q, "convert")
    info = {"scheme": f"qat_{q.name}", "keep_float": list(q.keep_float), "dtype": "float32"}
    if str(q.name) in GROUPED_SCHEMES:
        info["group_size"] = q.group_size
    return save_quantized(out_dir, model, info, tokenizer)
