"""Export a float model to compressed-tensors, the quantized-checkpoint format vLLM serves and transformers loads.

| scheme | weights                                  | activations                  | format (the package's choice) |
| ------ | ---------------------------------------- | ---------------------------- | ----------------------------- |
| w8a16  | int8, symmetric, one scale per row       | float                        | pack-quantized                |
| w8a8   | int8, symmetric, one scale per row       | int8 per token, per call     | int-quantized                 |
| w4a16  | int4, symmetric, one scale per row group | float                        | pack-quantized                |

Every `nn.Linear` is quantized but the LM head and the layers named in `keep_float` (the config's `ignore`);
embeddings and norms stay float. The integers are ours: w8a8 first folds SmoothQuant scales into the norms
and the preceding linears (smooth.py, as int8_smooth does), then w8a8 and w4a16 (and w8a16 when given
calibration batches) are rounded by GPTQ (gptq.py) block by block on the calibration batches; otherwise
each weight is rounded to nearest. The package then writes them: its own `QuantizationConfig` is the config,
its own compressor turns each layer's (dequantized weight, scale) into the stored tensors (checked to hold
our integers), and its `ModelCompressor` writes `quantization_config` into config.json. Weights that are
exactly zero stay zero (a pruned model exports dense, its zeros kept, with no sparsity metadata).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.calibration import CalibrationBatch, InputStats, update_blocks_sequentially
from trainer.choices import CompressedTensorsScheme
from trainer.errors import ConfigError, TrainerWarning
from trainer.models import is_conv1d, transformer_blocks, warn_unhandled_experts
from trainer.quant import smooth
from trainer.quant.gptq import gptq_quantize
from trainer.utils import require, staged

SCHEMES: tuple[str, ...] = tuple(CompressedTensorsScheme.__members__)
# (bits, activations quantized, one scale per group of columns) of each scheme.
_LAYOUT = {"w8a16": (8, False, False), "w8a8": (8, True, False), "w4a16": (4, False, True)}
# Symmetric ranges -qmax..qmax: every value has its negation, and the row's (group's) max is not clipped.
_QMAX = {8: 127, 4: 7}


def export_compressed_tensors(
    model: nn.Module,
    tokenizer: Any,
    output_dir: Path,
    *,
    scheme: str,
    calibration: Iterable[CalibrationBatch] | None = None,
    keep_float: list[str] | None = None,
    group_size: int = 128,
    alpha: float | None = None,
) -> Path:
    """Quantize `model` (a float HF causal LM) with `scheme` and write it to `output_dir` in compressed-tensors
    format (config.json with its `quantization_config`, model.safetensors, the tokenizer's files); returns
    `output_dir`.

    `calibration`: batches of training windows (`trainer.calibration.calibration_batches`: input ids and the
    position ids of packed documents; or tensors of input ids), moved to the model's device as they run, for
    SmoothQuant's activation ranges and GPTQ's Hessians; needed by w8a8 and w4a16, optional for w8a16 (GPTQ
    when given, else rounding to nearest). `keep_float`: linears whose names contain one of these stay float, besides the LM head.
    `group_size` (w4a16): columns per scale, lowered to the largest divisor of it that divides every
    quantized layer's input width (with a warning). `alpha` (w8a8): SmoothQuant's strength, None to search
    it per layer group (smooth.smooth_model).

    `model` is changed in place: smoothed (w8a8) and its quantized linears' weights replaced by the
    dequantized values written, so afterwards it computes what a reader of the directory computes (for w8a8,
    once `quantize_activations_per_token` is applied to it). The directory is written under a temporary
    name beside `output_dir` and renamed: a failed export leaves nothing at `output_dir`.
    """
    bits, act_quant, grouped = _check_scheme(scheme)
    ct = require("compressed_tensors", extra="compressed-tensors", package="compressed-tensors")
    from compressed_tensors.compressors import ModelCompressor

    _check_float(model)
    calibration = list(calibration or [])
    if scheme in ("w8a8", "w4a16") and not calibration:
        raise ConfigError(
            f"scheme={scheme} rounds its weights by GPTQ{' after SmoothQuant' if act_quant else ''}, which "
            "needs calibration batches: pass calibration=[input ids, ...] (e.g. a few batches of training "
            "sequences), or use scheme=w8a16, which rounds to nearest without them"
        )
    if group_size < 1:
        raise ConfigError(f"group_size={group_size}: must be >= 1, e.g. 128")
    keep = ["lm_head", *(keep_float or [])]
    head = model.get_output_embeddings()
    targets = {
        name: m
        for name, m in model.named_modules()
        if type(m) is nn.Linear and m is not head and not any(k in name for k in keep)
    }
    ignore = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name not in targets]
    if not targets:
        conv1d = any(is_conv1d(m) for m in model.modules())
        raise ConfigError(
            f"{type(model).__name__} has no nn.Linear layer to quantize outside keep_float={keep}: "
            "compressed-tensors quantizes Linear modules; "
            + (
                "GPT-2's Conv1D layers are not, and their transposed weights are not what its readers (vLLM, "
                "transformers) expect of a Linear: quantize this model with trainer.quantize instead"
                if conv1d
                else "keep fewer layers float"
            )
        )
    group = _group_size(targets, group_size) if grouped else None
    warn_unhandled_experts(
        model, feature=f"scheme={scheme}", consequence="they are written in float; the linears are quantized"
    )

    model.eval()
    if act_quant:
        _smooth(model, calibration, alpha)
    quantized = _round_weights(model, targets, calibration, qmax=_QMAX[bits], group_size=group)

    ct_scheme = quantization_scheme(scheme, group_size=group)
    config = ct.quantization.QuantizationConfig(
        config_groups={"group_0": ct_scheme},
        format=ct_scheme.format.value,
        quantization_status="compressed",
        ignore=ignore,
    )
    state = _compressed_state_dict(model, quantized, ct_scheme)

    output_dir = Path(output_dir)
    with staged(output_dir) as tmp:
        model_config = copy.deepcopy(model.config)
        if hasattr(model_config, "quantization_config"):  # a GGUF-loaded model's: its weights are floats
            del model_config.quantization_config
        model_config.save_pretrained(str(tmp))
        ModelCompressor(quantization_config=config).update_config(str(tmp))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(str(tmp))
        from safetensors.torch import save_file

        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return output_dir


def _check_scheme(scheme: str) -> tuple[int, bool, bool]:
    if scheme not in SCHEMES:
        raise ConfigError(
            f"scheme={scheme}: compressed-tensors export takes {', '.join(SCHEMES)} (int8 weights with float "
            "activations, int8 weights and activations, int4 weights in groups)"
        )
    return _LAYOUT[str(scheme)]


def _check_float(model: nn.Module) -> None:
    """Refuse a model whose weights are already quantized: rounding them again would export another model than
    the one given, and none of our other formats maps onto compressed-tensors as it is."""
    qc = getattr(model.config, "quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", qc)
    method = getattr(method, "value", method)  # transformers' QuantizationMethod enum
    if qc is not None and method != "gguf":  # GGUF loads dequantized to float: that one is fine
        raise ConfigError(
            f"the model was loaded quantized (quantization_config: {method}); export the float model it was "
            "made from (a run's hf/ export or checkpoint) with scheme=w8a16, w8a8 or w4a16"
        )
    for name, module in model.named_modules():
        if isinstance(module, smooth.Int8DynamicLinear):
            raise ConfigError(
                f"{name} is an int8_smooth layer (a trainer.quantize output): its 7-bit weights and per-tensor "
                "uint8 activations have no compressed-tensors equivalent. Export the float model it was "
                "quantized from (the run's hf/ export) with scheme=w8a8: int8 weights per channel and int8 "
                "activations per token, after the same SmoothQuant smoothing and GPTQ rounding"
            )
        if hasattr(module, "quantization_scheme"):
            raise ConfigError(
                f"{name} carries a compressed-tensors quantization already (the model was loaded from a "
                "compressed-tensors directory); export the float model it was made from"
            )
    for name, p in model.named_parameters():
        if type(p) not in (torch.Tensor, nn.Parameter) or not p.is_floating_point():
            raise ConfigError(
                f"{name} is a {type(p).__name__} of {p.dtype}, not a float tensor: the model is already "
                "quantized (a trainer.quantize or QAT output?). Export the float model it was made from (the "
                "run's hf/ export or a checkpoint) with scheme=w8a16, w8a8 or w4a16"
            )


def _group_size(targets: dict[str, nn.Linear], group_size: int) -> int:
    """`group_size`, or its largest divisor that divides every input width (a tiny model's 64, say)."""
    widths = sorted({m.in_features for m in targets.values()})
    group = math.gcd(group_size, *widths)
    if group != group_size:
        warnings.warn(
            f"scheme=w4a16: group_size={group_size} does not divide the input widths {widths}; using "
            f"{group}, the largest divisor of {group_size} that divides them all",
            TrainerWarning,
            stacklevel=3,
        )
    return group


def _smooth(model: nn.Module, calibration: list[CalibrationBatch], alpha: float | None) -> None:
    """SmoothQuant: move each input channel's range into the weights, the scales folded into the norms and
    the linears before (smooth.py); the LM head stays float, so it is not smoothed."""
    try:
        smooth.decoder_blocks(model)
    except ValueError as err:
        raise ConfigError(
            f"scheme=w8a8 folds SmoothQuant scales into Llama-style decoder blocks (RMSNorm before the "
            f"attention and the MLP), which {type(model).__name__} does not have; use scheme=w8a16 or w4a16"
        ) from err
    maxima, rows = smooth.calibrate(model, calibration)
    smooth.smooth_model(model, maxima, rows, alpha=alpha, head=False)


@torch.no_grad()
def _round_weights(
    model: nn.Module,
    targets: dict[str, nn.Linear],
    calibration: list[CalibrationBatch],
    *,
    qmax: int,
    group_size: int | None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(int8 values, fp32 scales) per target: GPTQ on `calibration` for the linears inside the transformer
    blocks when batches are given, rounding to nearest otherwise. Each weight is replaced by its dequantized
    values (so later blocks calibrate on what the quantized earlier ones output)."""
    quantized: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def store(name: str, linear: nn.Linear, q: torch.Tensor, scale: torch.Tensor) -> None:
        quantized[name] = (q, scale)
        linear.weight.copy_(dequantize(q, scale).to(linear.weight.dtype))

    in_blocks: dict[str, nn.Linear] = {}
    if calibration:
        names = {m: n for n, m in model.named_modules()}
        prefixes = tuple(names[b] + "." for b in transformer_blocks(model))
        in_blocks = {n: m for n, m in targets.items() if n.startswith(prefixes)}

    def gptq_one(name: str, linear: nn.Module, stats: InputStats) -> None:
        q, scale = gptq_quantize(
            linear.weight,
            stats.hessian,
            qmax=qmax,
            group_size=group_size,
            keep_zeros=True,
            scale_dtype=linear.weight.dtype,
        )
        store(name, linear, q, scale)

    if in_blocks:
        update_blocks_sequentially(model, calibration, in_blocks, gptq_one, with_hessian=True)
    for name, linear in targets.items():
        if name not in quantized:
            store(name, linear, *round_to_nearest(linear.weight, qmax=qmax, group_size=group_size))
    return quantized


def round_to_nearest(
    weight: torch.Tensor, *, qmax: int, group_size: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values in -qmax..qmax, fp32 scales: one per row, or per row and group of `group_size` columns)
    of `weight` rounded to nearest; the scales are max |w| / qmax, as the weight's dtype holds them."""
    w = weight.detach().float()
    rows, cols = w.shape
    g = group_size or cols
    groups = w.reshape(rows, cols // g, g)
    scale = (groups.abs().amax(-1) / qmax).clamp(min=1e-8).to(weight.dtype).float()
    scale.masked_fill_(scale == 0, 1.0)  # a row of zeros under float16 (1e-8 is below its range)
    q = torch.round(groups / scale[..., None]).clamp(-qmax, qmax).reshape(rows, cols).to(torch.int8)
    return q, scale if group_size else scale[:, 0]


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q * scale in fp32, the scale per row (shape rows) or per row and group (rows x groups)."""
    if scale.dim() == 1:
        return q.float() * scale[:, None]
    rows, cols = q.shape
    return (q.float().reshape(rows, scale.shape[1], -1) * scale[..., None]).reshape(rows, cols)


def quantization_scheme(scheme: str, *, group_size: int | None = None) -> Any:
    """The compressed-tensors `QuantizationScheme` of `scheme`, targeting every Linear, with the format the
    package's own inference picks for it (`infer_module_format`: the one vLLM's kernels expect)."""
    bits, act_quant, grouped = _check_scheme(scheme)
    q = require("compressed_tensors.quantization", extra="compressed-tensors", package="compressed-tensors")
    from compressed_tensors.compressors.format import infer_module_format

    weights = q.QuantizationArgs(
        num_bits=bits,
        type="int",
        symmetric=True,
        dynamic=False,
        strategy="group" if grouped else "channel",
        group_size=group_size if grouped else None,
    )
    activations = (
        q.QuantizationArgs(num_bits=8, type="int", symmetric=True, dynamic=True, strategy="token")
        if act_quant
        else None
    )
    out = q.QuantizationScheme(targets=["Linear"], weights=weights, input_activations=activations)
    out.format = infer_module_format(nn.Linear, out)
    return out


def _compressed_state_dict(
    model: nn.Module, quantized: dict[str, tuple[torch.Tensor, torch.Tensor]], ct_scheme: Any
) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors: the package's compressor applied to each quantized linear's (dequantized
    weight, scale), every other tensor as it is (a tied one once, under its first name)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    compressor = BaseCompressor.get_value_from_registry(ct_scheme.format)
    dtype = next(model.parameters()).dtype
    state: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, value in model.state_dict(keep_vars=True).items():
        module, _, leaf = name.rpartition(".")
        if module in quantized and leaf == "weight":
            q, scale = quantized[module]
            ct_scale = (scale[:, None] if scale.dim() == 1 else scale).to(dtype)
            out = compressor.compress({"weight": dequantize(q, scale), "weight_scale": ct_scale}, ct_scheme)
            stored = (
                out["weight"]
                if "weight" in out
                else unpack_from_int32(out["weight_packed"], ct_scheme.weights.num_bits, out["weight_shape"])
            )
            if not torch.equal(stored.to(torch.int8).cpu(), q.cpu()):
                raise RuntimeError(
                    f"compressed-tensors rounded {module}'s weight to other integers than ours"
                )
            state.update({f"{module}.{k}": v.detach().cpu().contiguous() for k, v in out.items()})
            continue
        if id(value) in seen:  # tied to a tensor already stored; config.json says so
            continue
        seen.add(id(value))
        state[name] = value.detach().cpu().contiguous()
    return state


def quantize_activations_per_token(model: nn.Module, *, keep_float: list[str] | None = None) -> list[Any]:
    """Make `model`'s quantized linears (as export_compressed_tensors chose them) round their inputs as w8a8's
    readers do: symmetric int8 per token, scale max |x| / 127.5, clamped to -128..127 (compressed-tensors'
    dynamic TOKEN rule). Returns the hook handles (`.remove()` undoes it)."""
    keep = ["lm_head", *(keep_float or [])]
    head = model.get_output_embeddings()

    def hook(_module, args):
        x = args[0]
        scale = (x.abs().amax(dim=-1, keepdim=True) / 127.5).clamp(min=1e-12)
        return (torch.clamp(x / scale, -128, 127).round() * scale,)

    return [
        m.register_forward_pre_hook(hook)
        for name, m in model.named_modules()
        if type(m) is nn.Linear and m is not head and not any(k in name for k in keep)
    ]
