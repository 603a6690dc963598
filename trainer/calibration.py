"""Layer-by-layer calibration, shared by one-shot pruning (Wanda, SparseGPT) and GPTQ quantization.

- `calibration_batches`, `data_calibration_batches`: batches of training windows (a run's own, or a data
  group's tokenized with a model's tokenizer, for trainer.quantize and trainer.export), as the `Batch`es
  training takes: input ids and, where the data has them, position ids; `model_inputs` is the forward's
  arguments for one, so that packed documents are calibrated on as they train, each seeing only itself;
- `InputStats`: what a linear layer's inputs look like (per-input squared norms for Wanda, X^T X for
  SparseGPT and GPTQ), summed over the calibration tokens;
- `update_blocks_sequentially`: the model's blocks in order, each calibrated on the outputs of the blocks
  before it *after* those were updated (as the Wanda, SparseGPT and GPTQ reference code does), so each
  block is calibrated on what it will really see. Only one block's inputs are held at a time;
- `inverse_hessian_factor` and `sweep_columns`: the optimal-brain-surgeon column loop SparseGPT and GPTQ
  share, parametrised by what each column becomes (pruned, or rounded to the grid).
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.data.loading import build_data
from trainer.data.prepared import Batch
from trainer.models import transformer_blocks

# A calibration batch: a `Batch` of training windows, or a tensor of input ids (one document per row).
CalibrationBatch = Batch | torch.Tensor


def calibration_batches(train, *, num_batches: int, batch_size: int, seed: int | None) -> list[Batch]:
    """`num_batches` batches of training windows, drawn without replacement (seeded), or the first ones in
    order when `seed` is None. They are what `train.batch` gives the training loop, position ids included."""
    count = min(len(train), num_batches * batch_size)
    if seed is None:
        order = torch.arange(count)
    else:
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:count]
    return [train.batch(order[i : i + batch_size]) for i in range(0, count, batch_size)]


def data_calibration_batches(
    data_cfg: Any, *, tokenizer: str, num_batches: int, batch_size: int
) -> list[Batch]:
    """The first num_batches x batch_size training windows of data group `data_cfg`, tokenized with `tokenizer`
    (a model's own, by name or directory): the offline tools' calibration (SmoothQuant, GPTQ). Tokenized in a
    temporary directory, read while it is there."""
    data_cfg = data_cfg.copy()
    data_cfg.tokenizer = tokenizer
    with tempfile.TemporaryDirectory() as tmp:
        train = build_data(data_cfg, run_dir=Path(tmp)).train
        return calibration_batches(train, num_batches=num_batches, batch_size=batch_size, seed=None)


def model_inputs(batch: CalibrationBatch, device: torch.device) -> dict[str, Any]:
    """The model's keyword arguments for one calibration batch, on `device`: the input ids and, where the data
    has them, the position ids, with no attention mask and no KV cache, which is when transformers keeps
    packed documents apart (as `CausalLMWithLoss` trains)."""
    ids, positions = (batch.inputs, batch.position_ids) if isinstance(batch, Batch) else (batch, None)
    kwargs = {"input_ids": ids.to(device), "use_cache": False}
    if positions is not None:
        kwargs["position_ids"] = positions.to(device)
    return kwargs


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
def update_blocks_sequentially(
    model: nn.Module,
    batches: list[CalibrationBatch],
    targets: dict[str, nn.Module],
    update_layer: Callable[[str, nn.Module, InputStats], None],
    *,
    with_hessian: bool,
) -> None:
    """Calibrate and update the targeted linears block by block; `update_layer(name, module, stats)` prunes
    or quantizes one (it may replace the module at `name`).

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
        for batch in batches:
            with contextlib.suppress(_Stop):
                model(**model_inputs(batch, device))
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
                update_layer(n, m, stats[n])
            outputs = [_block_output(block(h, *a, **k)) for h, (a, k) in zip(hidden, extra, strict=True)]
        hidden = outputs
    model.train(was_training)


def inverse_hessian_factor(
    weight: torch.Tensor, hessian: torch.Tensor, *, damp: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """What SparseGPT and GPTQ start from: (fp32 copy of the weight, upper Cholesky factor of H^-1).

    `hessian` is X^T X over the calibration inputs; inputs that were always zero get their weights zeroed
    (they cannot matter) and a unit diagonal, and `damp` x the mean diagonal is added for stability.
    """
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    return w, torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


# What column `i` of a block becomes (pruned, rounded): given the block's weights as updated so far, the
# block's part of the H^-1 factor, and the block's first column in the layer.
ColumnRule = Callable[[torch.Tensor, torch.Tensor, int, int], torch.Tensor]


def sweep_columns(w: torch.Tensor, hinv: torch.Tensor, rule: ColumnRule, *, block_size: int) -> torch.Tensor:
    """Set the columns of `w` left to right to what `rule` makes of them, spreading each column's error
    over the columns not yet processed through `hinv` (the upper Cholesky factor of H^-1); returns `w`,
    updated in place.

    Columns go in blocks of `block_size`: within a block the error is applied column by column, to the
    rest of the layer once per block (the lazy batch updates of GPTQ and SparseGPT's reference code).
    """
    cols = w.shape[1]
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1, hinv1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        for i in range(i2 - i1):
            col = w1[:, i]
            q = rule(w1, hinv1, i1, i)
            e = (col - q) / hinv1[i, i]
            w1[:, i:] -= e.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            w1[:, i] = q
            err1[:, i] = e
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return w
