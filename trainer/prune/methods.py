"""Which weights to remove: one function per criterion, each returning a keep-mask (True = kept).

- magnitude: the smallest |w| of the whole layer (the layer-wise baseline of the SparseGPT and Wanda papers);
- wanda: |w_ij| * ||x_j||_2, compared within each output row (Sun et al. 2023);
- nm: in every group of M consecutive inputs of a row, the N largest scores are kept (2:4 by default);
- sparsegpt: layer-wise reconstruction with the inverse Hessian of the layer inputs; removes weights and
  updates the remaining ones to compensate (Frantar & Alistarh 2023, following their reference code).

Counts are exact: a layer of n weights at sparsity s loses floor(s * n) of them (per row for wanda), so the
achieved sparsity is the requested one whenever s * n is a whole number.
"""

from __future__ import annotations

import math

import torch

from trainer.calibration import inverse_hessian_factor, sweep_columns


def _floor(x: float) -> int:
    return math.floor(x + 1e-6)  # 0.29 * 100 = 28.999...: still 29


def num_pruned(numel: int, sparsity: float) -> int:
    """How many of `numel` weights sparsity `sparsity` removes: floor(sparsity * numel)."""
    return min(numel, _floor(sparsity * numel))


def _keep_largest(scores: torch.Tensor, num_removed: int, *, dim: int | None = None) -> torch.Tensor:
    """Keep-mask removing exactly `num_removed` smallest scores (per slice along `dim` when given)."""
    if dim is None:
        flat = scores.reshape(-1)
        mask = torch.ones_like(flat, dtype=torch.bool)
        if num_removed:
            mask[torch.topk(flat, num_removed, largest=False, sorted=False).indices] = False
        return mask.view(scores.shape)
    mask = torch.ones_like(scores, dtype=torch.bool)
    if num_removed:
        idx = torch.topk(scores, num_removed, dim=dim, largest=False, sorted=False).indices
        mask.scatter_(dim, idx, False)
    return mask


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Remove the floor(sparsity * numel) weights of smallest magnitude in the whole tensor."""
    return _keep_largest(weight.detach().abs().float(), num_pruned(weight.numel(), sparsity))


def wanda_scores(weight: torch.Tensor, input_sq_norm: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||: `input_sq_norm[j]` is the sum (or mean) over calibration tokens of x_j^2."""
    return weight.detach().abs().float() * input_sq_norm.float().sqrt().view(1, -1)


def wanda_mask(weight: torch.Tensor, input_sq_norm: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per output row, remove the floor(sparsity * in_features) smallest |W_ij| * ||X_j||."""
    scores = wanda_scores(weight, input_sq_norm)
    return _keep_largest(scores, num_pruned(weight.shape[1], sparsity), dim=1)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n largest scores in every group of m consecutive inputs of each row (n:m sparsity)."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"{cols} input features do not split into groups of {m}")
    groups = scores.detach().float().reshape(rows, cols // m, m)
    return _keep_largest(groups, m - n, dim=2).reshape(rows, cols)


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    sparsity: float = 0.5,
    n: int = 0,
    m: int = 0,
    block_size: int = 128,
    damp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT on one linear layer: (new weight, keep-mask).

    `hessian` is X^T X over the calibration inputs (in_features square; any positive scale). Columns are
    processed left to right in blocks; within a block the mask is chosen by w^2 / [H^-1]_jj^2 (unstructured:
    per block; n:m: per group of m), and each removed weight's error is spread over the columns not yet
    processed through the Cholesky factor of H^-1. Runs in float32 whatever the weight's dtype.
    """
    w, hinv = inverse_hessian_factor(weight, hessian, damp=damp)
    rows = w.shape[0]
    mask = torch.ones_like(w, dtype=torch.bool)

    def prune_column(w1: torch.Tensor, hinv1: torch.Tensor, i1: int, i: int) -> torch.Tensor:
        if not n and i == 0:
            # Quota per block so that the layer loses exactly floor(sparsity * rows * cols) weights.
            i2 = i1 + w1.shape[1]
            quota = _floor(sparsity * rows * i2) - _floor(sparsity * rows * i1)
            mask[:, i1:i2] = _keep_largest(w1**2 / torch.diag(hinv1).view(1, -1) ** 2, quota)
        if n and i % m == 0:
            group = w1[:, i : i + m] ** 2 / torch.diag(hinv1)[i : i + m].view(1, -1) ** 2
            mask[:, i1 + i : i1 + i + m] = _keep_largest(group, m - n, dim=1)
        col = w1[:, i]
        return torch.where(mask[:, i1 + i], col, torch.zeros_like(col))

    w = sweep_columns(w, hinv, prune_column, block_size=block_size)
    return (w * mask).to(weight.dtype), mask
