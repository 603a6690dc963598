"""Calibration: batches of the run's own training data, and the activation statistics the one-shot methods
need (per-input squared norms for Wanda, X^T X for SparseGPT), gathered block by block.

Blocks are pruned in order, as the Wanda and SparseGPT reference code does: the inputs of block i are the
outputs of blocks 0..i-1 *after* those were pruned, so each block is calibrated on what it will really see.
Only one block's inputs are held at a time (calibration tokens x hidden size).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from trainer.models import transformer_blocks


def calibration_batches(train, *, num_batches: int, batch_size: int, seed: int) -> list[torch.Tensor]:
    """`num_batches` batches of input ids drawn without replacement from the training windows (seeded)."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train), generator=g)[: num_batches * batch_size]
    return [train.batch(order[i : i + batch_size])[0] for i in range(0, len(order), batch_size)]


@dataclass
class InputStats:
    """Running statistics of one linear layer's inputs over the calibration tokens."""

    num_tokens: int = 0
    sq_norm: torch.Tensor | None = None  # sum over tokens of x_j^2, per input feature
    hessian: torch.Tensor | None = None  # sum over tokens of x x^T (when asked for)
    with_hessian: bool = field(default=False, repr=False)

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        sq = (x * x).sum(0)
        self.sq_norm = sq if self.sq_norm is None else self.sq_norm + sq
        if self.with_hessian:
            xtx = x.T @ x
            self.hessian = xtx if self.hessian is None else self.hessian + xtx
        self.num_tokens += x.shape[0]


class _Stop(Exception):
    """Raised by the hook on the first block once its inputs are captured: the rest of the model need not run."""


def _block_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def prune_sequentially(
    model: nn.Module,
    batches: list[torch.Tensor],
    targets: dict[str, nn.Module],
    prune_layer: Callable[[str, nn.Module, InputStats], None],
    *,
    with_hessian: bool,
) -> None:
    """Calibrate and prune the targeted linears block by block; `prune_layer(name, module, stats)` prunes one.

    Targets must lie inside the transformer blocks (the caller checks); the model runs on its own device.
    """
    device = next(model.parameters()).device
    blocks = transformer_blocks(model)
    names = {m: n for n, m in model.named_modules()}
    captured: list[tuple[tuple, dict]] = []

    def catch(_module, args, kwargs):
        captured.append((args, kwargs))
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(catch, with_kwargs=True)
    was_training = model.training
    model.eval()
    try:
        for ids in batches:
            with contextlib.suppress(_Stop):
                model(input_ids=ids.to(device), use_cache=False)
    finally:
        handle.remove()
    # Each batch's block input, and the other arguments the model passed to its blocks (masks, rotary angles).
    hidden = [args[0] if args else kwargs.pop("hidden_states") for args, kwargs in captured]
    extra = [(args[1:], kwargs) for args, kwargs in captured]

    for block in blocks:
        prefix = names[block] + "."
        mine = {n: m for n, m in targets.items() if n.startswith(prefix)}
        stats = {n: InputStats(with_hessian=with_hessian) for n in mine}
        hooks = [
            m.register_forward_hook(lambda _m, inp, _out, s=stats[n]: s.add(inp[0])) for n, m in mine.items()
        ]
        try:
            outputs = [_block_output(block(h, *a, **k)) for h, (a, k) in zip(hidden, extra, strict=True)]
        finally:
            for h in hooks:
                h.remove()
        if mine:
            for n, m in mine.items():
                prune_layer(n, m, stats[n])
            outputs = [_block_output(block(h, *a, **k)) for h, (a, k) in zip(hidden, extra, strict=True)]
        hidden = outputs
    model.train(was_training)
