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

from trainer.prune.calibrate import InputStats, prune_sequentially
from trainer.prune.methods import inverse_hessian_factor
from trainer.quant.smooth import WEIGHT_QMAX, Int8DynamicLinear, decoder_blocks, int8_targets


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    qmax: int = WEIGHT_QMAX,
    block_size: int = 128,
    damp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values in -qmax..qmax, fp32 scale per row) of one linear's weight, rounded by GPTQ.

    The scales are those of rounding to nearest (row max / qmax); only the rounding differs. With an
    identity Hessian (uncorrelated inputs) nothing is spread and the result is rounding to nearest.
    """
    w, hinv = inverse_hessian_factor(weight, hessian, damp=damp)
    cols = w.shape[1]
    scale = (w.abs().amax(dim=1) / qmax).clamp(min=1e-8)
    q = torch.empty_like(w)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1, hinv1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        for i in range(i2 - i1):
            col = w1[:, i]
            qi = torch.round(col / scale).clamp(-qmax, qmax)
            q[:, i1 + i] = qi
            e = (col - qi * scale) / hinv1[i, i]
            w1[:, i:] -= e.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return q.to(torch.int8), scale


@torch.no_grad()
def quantize_blocks_gptq(
    model: nn.Module, batches: list[torch.Tensor], *, keep_float: list[str]
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

    prune_sequentially(model, batches, targets, quantize_one, with_hessian=True)
    return list(targets)


class _HeadReached(Exception):
    """Raised by the hook on the LM head once its input is recorded: the logits are not needed."""


@torch.no_grad()
def quantize_head_gptq(model: nn.Module, batches: list[torch.Tensor], name: str) -> None:
    """Replace the LM head, the module at `name`, by an Int8DynamicLinear rounded by GPTQ on its inputs
    over `batches` (after the blocks were quantized)."""
    head = model.get_submodule(name)
    stats = InputStats(with_hessian=True)

    def record(_m, args):
        stats.add(args[0])
        raise _HeadReached

    handle = head.register_forward_pre_hook(record)
    try:
        model.eval()
        for ids in batches:
            with contextlib.suppress(_HeadReached):
                model(input_ids=ids, use_cache=False)
    finally:
        handle.remove()
    model.set_submodule(name, Int8DynamicLinear.from_linear(head, gptq_quantize(head.weight, stats.hessian)))
