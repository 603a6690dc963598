"""GPTQ rounding for int8_smooth's weights: round each column to the grid, spread its error over the rest.

Rounding each weight to its nearest grid point (7-bit, one scale per output row, see smooth.py) ignores
that the layer's inputs are correlated. GPTQ (Frantar et al., 2022) quantizes the columns left to right
and, through the Cholesky factor of the inverse of H = X^T X (calibration inputs), moves each column's
rounding error onto the columns not yet quantized, which lowers the error of the layer's output X W^T.
Layers are processed block by block on inputs that went through the already-quantized blocks, so later
blocks also correct what earlier ones lost. The LM head, when quantized, comes last, on the outputs of
the quantized blocks.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from trainer.calibration import (
    CalibrationBatch,
    InputStats,
    inverse_hessian_factor,
    model_inputs,
    sweep_columns,
    update_blocks_sequentially,
)
from trainer.quant.smooth import WEIGHT_QMAX, Int8DynamicLinear, decoder_blocks, int8_targets


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    qmax: int = WEIGHT_QMAX,
    block_size: int = 128,
    damp: float = 0.01,
    group_size: int | None = None,
    keep_zeros: bool = False,
    scale_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values in -qmax..qmax, fp32 scales) of one linear's weight, rounded by GPTQ.

    The scales are those of rounding to nearest (max |w| / qmax), one per row, or with `group_size` one per
    row and group of that many columns (shape rows x groups), taken from the group's weights as updated
    when the sweep reaches it (as GPTQ's reference code does). Scales are rounded to `scale_dtype` before
    use, so that one stored in that dtype is the one the values were rounded with. `keep_zeros` keeps
    every weight that is exactly zero at zero (a pruned model keeps its sparsity; the error of the others
    is still spread, over the non-zeros). With an identity Hessian (uncorrelated inputs) nothing is spread
    and the result is rounding to nearest.
    """
    w, hinv = inverse_hessian_factor(weight, hessian, damp=damp)
    zeros = weight.detach() == 0 if keep_zeros else None
    q = torch.empty_like(w)
    if group_size is None:
        scale = _scale(w, qmax, scale_dtype)
    else:
        scale = torch.empty(w.shape[0], w.shape[1] // group_size, dtype=torch.float32, device=w.device)
        block_size = max(block_size // group_size, 1) * group_size  # a group never straddles two blocks

    def round_column(w1: torch.Tensor, _hinv1: torch.Tensor, i1: int, i: int) -> torch.Tensor:
        j = i1 + i
        if group_size is None:
            s = scale
        else:
            if j % group_size == 0:
                scale[:, j // group_size] = _scale(w1[:, i : i + group_size], qmax, scale_dtype)
            s = scale[:, j // group_size]
        q[:, j] = torch.round(w1[:, i] / s).clamp(-qmax, qmax)
        if zeros is not None:
            q[:, j].masked_fill_(zeros[:, j], 0)
        return q[:, j] * s

    sweep_columns(w, hinv, round_column, block_size=block_size)
    return q.to(torch.int8), scale


def _scale(w: torch.Tensor, qmax: int, dtype: torch.dtype) -> torch.Tensor:
    """max |w| / qmax per row, as `dtype` holds it (in fp32); 1 for a row of zeros (any scale rounds it to 0)."""
    s = (w.abs().amax(dim=1) / qmax).clamp(min=1e-8).to(dtype).float()
    return s.masked_fill_(s == 0, 1.0)  # 1e-8 is below float16's range


@torch.no_grad()
def quantize_blocks_gptq(
    model: nn.Module, batches: list[CalibrationBatch], *, keep_float: list[str]
) -> list[str]:
    """Replace the linears of the decoder blocks (but those named in `keep_float`) by Int8DynamicLinear
    with GPTQ-rounded weights, block by block on `batches`; returns their names."""
    names = {block: name for name, block in model.named_modules()}
    targets = {}
    for block in decoder_blocks(model):
        targets.update(int8_targets(block, keep_float=keep_float, prefix=names[block]))

    def quantize_one(name: str, linear: nn.Module, stats: InputStats) -> None:
        quantized = gptq_quantize(linear.weight, stats.hessian)
        model.set_submodule(name, Int8DynamicLinear.from_linear(linear, quantized))

    update_blocks_sequentially(model, batches, targets, quantize_one, with_hessian=True)
    return list(targets)


class _HeadReached(Exception):
    """Raised by the hook on the LM head once its input is recorded: the logits are not needed."""


@torch.no_grad()
def quantize_head_gptq(model: nn.Module, batches: list[CalibrationBatch], name: str) -> None:
    """Replace the LM head, the module at `name`, by an Int8DynamicLinear rounded by GPTQ on its inputs
    over `batches` (after the blocks were quantized)."""
    head = model.get_submodule(name)
    stats = InputStats(with_hessian=True)

    def record(_m, args):
        stats.add(args[0])
        raise _HeadReached

    handle = head.register_forward_pre_hook(record)
    device = next(model.parameters()).device
    try:
        model.eval()
        for batch in batches:
            with contextlib.suppress(_HeadReached):
                model(**model_inputs(batch, device))
    finally:
        handle.remove()
    model.set_submodule(name, Int8DynamicLinear.from_linear(head, gptq_quantize(head.weight, stats.hessian)))
