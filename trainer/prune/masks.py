"""Masks kept by canonical parameter name, and their enforcement on whatever each strategy holds.

A mask is a whole boolean tensor (True = kept) on every rank, keyed by the HF state-dict name. What it is
applied to is looked up afresh every time, never cached, because the tensors move under the strategies:

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

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from trainer.shards import SaveSlice, ShardReader, replicated_save_slice
from trainer.strategy import named_parameters

MASK_PREFIX = "mask/"


@dataclass
class Piece:
    """A flat range [start, start + tensor.numel()) of parameter `name`, held by `tensor` (a 1-D view)."""

    name: str
    start: int
    tensor: torch.Tensor
    kind: str  # "weight", "grad" or "state"


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.view(-1)


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _plain_pieces(strategy, module: nn.Module, optimizer, names: set[str]) -> list[Piece]:
    """single, ddp and fsdp: parameters (DTensor shards under fsdp), their gradients and states."""
    from torch.distributed.tensor import DTensor

    if strategy.name == "fsdp":
        strategy._reshard(module)  # after an eval forward the root's parameters are still gathered
        from trainer.fsdp import _row_offset
    out = []
    for name, p in named_parameters(module):
        if name not in names:
            continue
        start = _row_offset(p)[0] if isinstance(p, DTensor) else 0
        local = _local(p)
        out.append(Piece(name, start, _flat(local.data), "weight"))
        if p.grad is not None:
            out.append(Piece(name, start, _flat(_local(p.grad)), "grad"))
        for value in optimizer.state.get(p, {}).values():
            if torch.is_tensor(value) and value.is_floating_point() and value.numel() == p.numel():
                out.append(Piece(name, start, _flat(_local(value)), "state"))
    return out


def _zero_pieces(strategy, module: nn.Module, optimizer, names: set[str]) -> list[Piece]:
    """DeepSpeed ZeRO: this rank's fragments of the fp32 master, its gradient and states, and the bit16 copy."""
    inner, rank, out = optimizer.optimizer, strategy.env.rank, []
    if strategy.stage == 3:
        for name, p in named_parameters(module):
            if name not in names:
                continue
            group, offset, _ = optimizer.grad_position[optimizer.get_param_id(p)]
            flat = optimizer.fp32_partitioned_groups_flat[group]
            per = p.ds_tensor.ds_numel
            start, valid = rank * per, max(0, min(per, p.ds_numel - rank * per))
            out += _fragment_pieces(name, start, flat, offset, valid, inner)
            out.append(Piece(name, start, p.ds_tensor.data.view(-1)[:valid], "weight"))
            if p.data.numel() == p.ds_numel:  # a persistent small parameter, held gathered
                out.append(Piece(name, 0, _flat(p.data), "weight"))
        return out
    group_of = {id(p): i for i, params in enumerate(optimizer.bit16_groups) for p in params}
    for name, p in named_parameters(module):
        if name not in names:
            continue
        out.append(Piece(name, 0, _flat(p.data), "weight"))  # every rank holds the whole working weights
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is None:  # no fragment of this parameter in this rank's partition
            continue
        flat = optimizer.single_partition_of_fp32_groups[group_of[id(p)]]
        where = mapping.hp_fragment_address
        out += _fragment_pieces(
            name, mapping.lp_fragment_address.start, flat, where.start, where.numel, inner
        )
    return out


def _fragment_pieces(name, start, flat, offset, length, inner) -> list[Piece]:
    out = [Piece(name, start, flat.data.narrow(0, offset, length), "weight")]
    if flat.grad is not None:
        out.append(Piece(name, start, flat.grad.narrow(0, offset, length), "grad"))
    for value in inner.state.get(flat, {}).values():
        if torch.is_tensor(value) and value.is_floating_point() and value.shape == flat.shape:
            out.append(Piece(name, start, value.narrow(0, offset, length), "state"))
    return out


def pieces(strategy, module: nn.Module, optimizer, names: set[str]) -> list[Piece]:
    """Every tensor range this rank holds of the named parameters, looked up now (never cached)."""
    if strategy.name.startswith("zero"):
        return _zero_pieces(strategy, module, optimizer, names)
    return _plain_pieces(strategy, module, optimizer, names)


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
        stepper = optimizer.optimizer if strategy.name.startswith("zero") else optimizer
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
        for piece in pieces(self.strategy, self.module, self.optimizer, set(self.masks)):
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
