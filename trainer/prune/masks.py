"""Masks kept by canonical parameter name, and their enforcement on whatever each strategy holds.

A mask is a whole boolean tensor (True = kept) on every rank, keyed by the HF state-dict name. What it is
applied to is the strategy's view of what this rank holds (`Strategy.pieces`), looked up afresh every time,
never cached, because the tensors move under the strategies:

- single, ddp: the parameter, its gradient and its optimizer states, whole;
- fsdp: the local rows of each DTensor (parameter, gradient, states), at the flat offset its placement
  gives; FSDP2 swaps sharded and unsharded parameters, so views are taken from the optimizer's current ones;
- zero1/2/3: the fragment of DeepSpeed's flat fp32 master partition (and of its gradient and optimizer
  states) that holds this parameter, plus the bit16 working copy (whole under stage 1/2, this rank's
  partition under stage 3). Masking only the working weights would not hold: the next step copies the
  revived master back.

Enforcement is two hooks on the torch optimizer that does the arithmetic (DeepSpeed's inner one under
ZeRO): before its step the gradients of pruned weights are zeroed, so the moments never see them; after
it, the weights and states are masked (weight decay or an optimizer that moves zero-gradient weights
cannot revive them), before DeepSpeed copies the master to the working weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from trainer.shards import SaveSlice, ShardReader, replicated_save_slice

MASK_PREFIX = "mask/"


class MaskEnforcer:
    """Applies `masks` to a wrapped model's weights, gradients and optimizer states, through optimizer hooks."""

    def __init__(self, masks: dict[str, torch.Tensor], *, device: torch.device) -> None:
        self.device = device
        self.set_masks(masks)
        self._handles: list = []

    def set_masks(self, masks: dict[str, torch.Tensor]) -> None:
        self.masks = masks
        # Flattened keep-masks on the device (masks are ours and never swapped: safe to cache).
        self._flat = {n: m.reshape(-1).to(self.device) for n, m in masks.items()}

    def attach(self, strategy, module: nn.Module, optimizer) -> None:
        self.strategy, self.module, self.optimizer = strategy, module, optimizer
        stepper = strategy.stepping_optimizer(optimizer)
        self._handles = [
            stepper.register_step_pre_hook(lambda *_: self.apply(kinds=("grad",))),
            stepper.register_step_post_hook(lambda *_: self.apply(kinds=("weight", "state"))),
        ]
        self.apply()

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @torch.no_grad()
    def apply(self, *, kinds: tuple[str, ...] = ("weight", "grad", "state")) -> None:
        for piece in self.strategy.pieces(self.module, self.optimizer, set(self.masks)):
            if piece.kind in kinds and piece.tensor.numel():
                keep = self._flat[piece.name][piece.start : piece.start + piece.tensor.numel()]
                piece.tensor.mul_(keep.to(device=piece.tensor.device, dtype=piece.tensor.dtype))


def owned_zero_counts(strategy, module, optimizer, names: list[str]) -> torch.Tensor:
    """Zeros per named parameter over the ranges this rank writes to a checkpoint (each element counted
    on exactly one rank, whatever the sharding or replication); sum over ranks for the whole model."""
    index = {f"model/{n}": i for i, n in enumerate(names)}
    counts = torch.zeros(len(names), dtype=torch.float64)
    for s in strategy.save_slices(module, optimizer):
        i = index.get(s.key)
        if i is not None:
            counts[i] += int((s.values == 0).sum())
    return counts


def mask_save_slices(masks: dict[str, torch.Tensor], *, rank: int, world_size: int) -> list[SaveSlice]:
    """Masks in the checkpoint's flat-shard format (`mask/NAME`, uint8), each rank writing its share."""
    out = []
    for name, m in masks.items():
        out += replicated_save_slice(
            MASK_PREFIX + name, m.to(torch.uint8).cpu(), rank=rank, world_size=world_size
        )
    return out


def read_masks(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The masks saved with a checkpoint (any world size), or {} when it has none."""
    reader = ShardReader(Path(checkpoint) / "shards")
    out = {}
    for key, shape in reader.shapes.items():
        if key.startswith(MASK_PREFIX):
            numel = 1
            for d in shape:
                numel *= d
            out[key.removeprefix(MASK_PREFIX)] = reader.read(key, 0, numel).view(shape).bool()
    return out


def broadcast_masks(masks: dict[str, torch.Tensor], *, device: torch.device) -> dict[str, torch.Tensor]:
    """Rank 0's masks on every rank (the same names and shapes everywhere), so that all ranks agree bit for bit."""
    if not dist.is_initialized():
        return masks
    out = {}
    for name in sorted(masks):
        t = masks[name].to(device=device, dtype=torch.uint8)
        dist.broadcast(t, src=0)
        out[name] = t.bool().cpu()
    return out


def broadcast_weights(model: nn.Module, names: list[str], *, device: torch.device) -> None:
    """Rank 0's values of the named parameters on every rank (SparseGPT changes the weights it keeps)."""
    if not dist.is_initialized():
        return
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in names:
            p = params[name]
            t = p.detach().to(device).contiguous()
            dist.broadcast(t, src=0)
            p.copy_(t.to(p.device))
