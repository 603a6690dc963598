"""Post-training quantization schemes, and where each can run.

| scheme        | weights                  | activations               | kernels                              |
| ------------- | ------------------------ | ------------------------- | ------------------------------------ |
| int8_weight   | int8 per channel         | float                     | torchao Int8WeightOnlyConfig, any device |
| int8_dynamic  | int8 per channel         | int8 per token, per call  | torchao Int8DynamicActivationInt8WeightConfig (`_int_mm`: fast on GPUs, slow on CPUs without VNNI) |
| int8_smooth   | 7-bit per channel, smoothed, GPTQ-rounded | uint8 per token, per call | fbgemm (CPU) after SmoothQuant smoothing (smooth.py) |
| int4_weight   | int4, groups of group_size | bfloat16                | torchao Int4WeightOnlyConfig, CUDA tinygemm |
| sparse24      | 2:4 semi-structured      | float16 or bfloat16       | torchao SemiSparseWeightConfig, CUDA (compute capability 8.0+) |

Layers whose names contain one of `keep_float` are left in float (default_keep_float: the LM head, but
for int8_smooth). GPT-2's Conv1D layers (a linear with its weight stored [in, out]) become the equivalent
nn.Linear first, which every kernel here takes (the manifest lists them, so that loading builds the same);
a scheme that would quantize no layer at all is refused, never saved as a "quantized" float model. "float" is the model's dtype, set before quantizing (scheme_dtype: float32 by default,
bfloat16 or float16 where the kernels need it or a GPU runs faster with it). Each check runs before any
model is loaded, so a scheme that cannot run here fails at once with what it needs.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from trainer.calibration import CalibrationBatch
from trainer.choices import DTYPES
from trainer.errors import ConfigError
from trainer.models import conv1d_to_linear, is_conv1d, layer_types, warn_unhandled_experts
from trainer.quant import smooth
from trainer.quant.config import QuantScheme
from trainer.quant.gptq import quantize_blocks_gptq, quantize_head_gptq
from trainer.utils import dtype_name, require, resolve_dtype

SCHEMES: tuple[str, ...] = tuple(QuantScheme.__members__)
CPU_SCHEMES = ("int8_dynamic", "int8_smooth", "int8_weight")


def check_scheme(scheme: str, device: torch.device) -> None:
    """Fail early, naming what is needed, when `scheme` cannot run on `device`."""
    if scheme not in SCHEMES:
        raise ConfigError(f"scheme={scheme}: choose one of {', '.join(SCHEMES)}")
    if scheme == "int8_smooth":
        if device.type != "cpu":
            raise ConfigError(
                "scheme=int8_smooth runs on fbgemm's CPU kernels; use device=cpu, or scheme=int8_dynamic "
                "on a GPU (torchao's int8 matmul is fast there)"
            )
        if "fbgemm" not in torch.backends.quantized.supported_engines:
            raise ConfigError(
                "scheme=int8_smooth needs PyTorch's fbgemm quantized engine (x86 CPUs), which this build "
                "lacks; use scheme=int8_weight"
            )
        return
    require("torchao.quantization", extra="quant", package="torchao")
    if scheme == "int4_weight" and device.type != "cuda":
        raise ConfigError(
            "scheme=int4_weight needs an NVIDIA GPU: torchao's int4 weight-only kernels are CUDA's tinygemm "
            f"(packing tile_packed_to_4d) or the mslk package's, and this run is on {device.type}. "
            "Use scheme=int8_weight on a CPU"
        )
    if scheme == "sparse24":
        if device.type != "cuda":
            raise ConfigError(
                "scheme=sparse24 needs an NVIDIA GPU of compute capability 8.0+ (A100, H100, L4, RTX 30xx "
                f"and newer): 2:4 semi-structured sparse kernels are CUDA-only and this run is on {device.type}. "
                "On a CPU, a 2:4-pruned model runs as a dense one (no speed-up)"
            )
        if torch.cuda.get_device_capability(device) < (8, 0):
            raise ConfigError(
                f"scheme=sparse24 needs compute capability 8.0+; {torch.cuda.get_device_name(device)} has "
                f"{torch.cuda.get_device_capability(device)}"
            )


# The dtypes each scheme's kernels take for the float parts (activations, layers kept in float, scales).
SCHEME_DTYPES = {
    "int8_smooth": ("float32",),  # fbgemm's quantized linears take and return float32
    "int4_weight": ("bfloat16",),  # tinygemm takes bfloat16 activations and scales
    "sparse24": ("float16", "bfloat16"),  # cuSPARSELt / CUTLASS 2:4 kernels take half-precision weights
}


def scheme_dtype(scheme: str, dtype: str | None) -> torch.dtype:
    """The dtype the quantized model runs in: `dtype`, or the scheme's first when None; an error naming the
    choices where the scheme's kernels cannot take it."""
    allowed = SCHEME_DTYPES.get(scheme, DTYPES)
    name = dtype if dtype is not None else allowed[0]
    if name not in DTYPES:
        raise ConfigError(
            f"dtype={name}: choose one of {', '.join(DTYPES)}, or null for the scheme's default"
        )
    if name not in allowed:
        raise ConfigError(
            f"scheme={scheme} with dtype={name}: its kernels take {' or '.join(allowed)}; "
            f"set dtype={allowed[0]} or leave it null"
        )
    return resolve_dtype(name)


def default_keep_float(scheme: str) -> list[str]:
    """Layers left in float unless `keep_float` says otherwise: the LM head, whose inputs have the widest
    channel outliers, except under int8_smooth, which smooths it and rounds it by GPTQ like the blocks
    (0.35 points of perplexity on SmolLM2 for a 1.2x faster prefill: the head is a fifth of its matmuls)."""
    return [] if scheme == "int8_smooth" else ["lm_head"]


def _filter(keep_float: list[str]) -> Callable[[nn.Module, str], bool]:
    return lambda module, fqn: isinstance(module, nn.Linear) and not any(k in fqn for k in keep_float)


def conv1d_as_linear(model: nn.Module, names: Iterable[str]) -> list[str]:
    """Replace the GPT-2 Conv1D layers at `names` by the nn.Linear that computes the same; returns the names."""
    names = list(names)
    for name in names:
        model.set_submodule(name, conv1d_to_linear(model.get_submodule(name)))
    return names


def check_targets(model: nn.Module, scheme: str, keep_float: list[str]) -> int:
    """How many layers `scheme` will quantize; none is an error naming what the model is made of."""
    count = sum(_filter(keep_float)(m, n) for n, m in model.named_modules())
    if count == 0:
        raise ConfigError(
            f"scheme={scheme} finds no linear layer of {type(model).__name__} to quantize outside "
            f"keep_float={keep_float} (its layer types: {', '.join(layer_types(model))}); nothing would be "
            "quantized: keep fewer layers in float (keep_float=[]), or quantize a model with linear layers"
        )
    return count


def torchao_config(scheme: str, *, group_size: int = 128) -> Any:
    """The torchao config object of a torchao scheme."""
    q = require("torchao.quantization", extra="quant", package="torchao")
    if scheme == "int8_weight":
        return q.Int8WeightOnlyConfig()
    if scheme == "int8_dynamic":
        return q.Int8DynamicActivationInt8WeightConfig()
    if scheme == "int4_weight":
        return q.Int4WeightOnlyConfig(group_size=group_size, int4_packing_format="tile_packed_to_4d")
    raise ValueError(f"{scheme} is not a torchao scheme")


def sparsify_24(model: nn.Module, keep_float: list[str]) -> None:
    """Put the 2:4-pruned linear weights on the semi-structured sparse kernels (CUDA): the kept values and
    their positions, compressed without loss."""
    api = require("torchao.sparsity.sparse_api", extra="quant", package="torchao")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        api.sparsify_(model, api.SemiSparseWeightConfig(), filter_fn=_filter(keep_float))


def check_2_4_sparse(model: nn.Module, keep_float: list[str]) -> None:
    """2:4 kernels keep 2 values of every 4 along a row: the weights must already be pruned that way."""
    for name, module in model.named_modules():
        if _filter(keep_float)(module, name):
            w = module.weight.detach()
            if w.shape[1] % 4 or (w.reshape(-1, 4) != 0).sum(1).max() > 2:
                raise ConfigError(
                    f"scheme=sparse24: {name}.weight is not 2:4 sparse (at most 2 non-zeros in every 4 "
                    "consecutive weights of a row); prune the model to a 2:4 pattern first"
                )


def quantize_model(
    model: nn.Module,
    scheme: str,
    *,
    keep_float: list[str],
    group_size: int = 128,
    calibration: Iterable[CalibrationBatch] = (),
    alpha: float | None = None,
    gptq: bool = False,
    dtype: str | None = None,
) -> dict[str, Any]:
    """Quantize `model` in place, its float parts in `dtype` (None: the scheme's, see scheme_dtype); returns
    what the manifest needs to rebuild it (see serialization.py). `calibration` (int8_smooth): batches of
    training windows (`trainer.calibration`), moved to the model's device as they run."""
    info: dict[str, Any] = {"scheme": scheme, "keep_float": list(keep_float)}
    model.to(scheme_dtype(scheme, dtype))
    if scheme == "int8_smooth":
        check_targets(model, scheme, keep_float)
        calibration = list(calibration)
        head = model.get_output_embeddings()
        head_name = next((n for n, m in model.named_modules() if m is head), "")
        int8_head = type(head) is nn.Linear and not any(k in head_name for k in keep_float)
        maxima, rows = smooth.calibrate(model, calibration)
        smooth.smooth_model(model, maxima, rows, alpha=alpha, head=int8_head)
        # GPTQ rounds the blocks' linears, then the head, on the calibration data; other linears outside
        # the blocks (if any) are rounded to nearest.
        rounded = []
        if gptq:
            rounded = quantize_blocks_gptq(model, calibration, keep_float=keep_float)
            if int8_head:
                quantize_head_gptq(model, calibration, head_name)
                rounded.append(head_name)
        info["int8_linears"] = rounded + smooth.swap_linears(model, keep_float=keep_float)
        info["alpha"] = alpha if alpha is not None else "searched"
        info["rounding"] = "gptq" if gptq else "nearest"
        return info
    conv1d = [n for n, m in model.named_modules() if is_conv1d(m) and not any(k in n for k in keep_float)]
    if conv1d:
        info["conv1d_as_linear"] = conv1d_as_linear(model, conv1d)
    check_targets(model, scheme, keep_float)
    if scheme == "sparse24":
        check_2_4_sparse(model, keep_float)
        sparsify_24(model, keep_float)
    else:
        quantize_ = require("torchao.quantization", extra="quant", package="torchao").quantize_
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_(model, torchao_config(scheme, group_size=group_size), filter_fn=_filter(keep_float))
    info["dtype"] = dtype_name(model)
    warn_unhandled_experts(
        model,
        feature=f"scheme={scheme}",
        consequence="they stay in float; the linears (attention, shared expert) are quantized",
    )
    if scheme == "int4_weight":
        info["group_size"] = group_size
    return info
