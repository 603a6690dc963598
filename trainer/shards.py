"""The flat-shard tensor format behind every checkpoint, whatever the strategy and world size.

Every tensor (a parameter, or an optimizer state of a parameter) is seen as its row-major flattening.
Each rank writes the contiguous ranges it holds into its own safetensors file, named `KEY@START`;
loading reads, for every range a rank now needs, the overlapping pieces from whichever files hold
them. A DDP replica, an FSDP2 row shard (a dim-0 shard is a contiguous range of the flattening) and a
DeepSpeed ZeRO partition (a contiguous range of a flattened parameter) are all such ranges, so a
checkpoint saved by any strategy on any number of ranks loads into any other, optimizer state included,
without gathering a whole model anywhere. Keys are the HF state-dict names: `model/NAME` for weights,
`optim/NAME/STATE` for optimizer states.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from trainer.errors import CheckpointError


@dataclass
class SaveSlice:
    """A range this rank writes: `values` holds elements [start, start + numel) of the flattened tensor."""

    key: str
    shape: tuple[int, ...]
    start: int
    values: torch.Tensor


@dataclass
class LoadSlice:
    """A range this rank needs: `assign` receives elements [start, start + length) of the flattened tensor."""

    key: str
    shape: tuple[int, ...]
    start: int
    length: int
    assign: Callable[[torch.Tensor], None]


def replicated_save_slice(key: str, tensor: torch.Tensor, *, rank: int, world_size: int) -> list[SaveSlice]:
    """A tensor every rank holds whole: each rank writes its 1/world of it, so the write is parallel."""
    flat = tensor.detach().reshape(-1)
    per = math.ceil(flat.numel() / world_size) if flat.numel() else 0
    start, end = rank * per, min(flat.numel(), (rank + 1) * per)
    if start >= end and not (flat.numel() == 0 and rank == 0):
        return []
    return [SaveSlice(key, tuple(tensor.shape), start, flat[start:end])]


def replicated_load_slice(key: str, tensor: torch.Tensor) -> LoadSlice:
    """A tensor every rank holds whole: read it all and copy it in place."""

    def assign(values: torch.Tensor) -> None:
        with torch.no_grad():
            tensor.copy_(values.view(tensor.shape).to(tensor.dtype))

    return LoadSlice(key, tuple(tensor.shape), 0, tensor.numel(), assign)


def is_number(value: object) -> bool:
    """A Python int or float (a bool is neither here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def number_save_slices(key: str, value: float, *, rank: int, world_size: int) -> list[SaveSlice]:
    """A Python number every rank holds (a step count kept as int): rank 0 writes it as a 0-d float64 tensor."""
    scalar = torch.tensor(float(value), dtype=torch.float64)
    return replicated_save_slice(key, scalar, rank=rank, world_size=world_size)


def number_load_slice(key: str, holder: dict, name: str) -> LoadSlice:
    """Set `holder[name]`, a Python number, from a 0-d tensor (or a number saved as one), keeping its type."""
    kind = type(holder[name])

    def assign(values: torch.Tensor) -> None:
        holder[name] = kind(values.reshape(()).item())

    return LoadSlice(key, (), 0, 1, assign)


def _own_storage(t: torch.Tensor, seen: set[int]) -> torch.Tensor:
    """safetensors refuses tensors that share storage: copy views into bigger buffers and repeats."""
    storage = t.untyped_storage()
    whole = t.is_contiguous() and t.storage_offset() == 0 and storage.nbytes() == t.numel() * t.element_size()
    if not whole or storage.data_ptr() in seen:
        return t.clone()
    seen.add(storage.data_ptr())
    return t


def shard_file(directory: Path, rank: int) -> Path:
    """The shard file rank `rank` writes in `directory`."""
    return directory / f"rank_{rank:05d}.safetensors"


def write_shards(directory: Path, slices: Iterable[SaveSlice], *, rank: int) -> None:
    tensors, shapes, seen = {}, {}, set()
    for s in slices:
        name = f"{s.key}@{s.start}"
        tensors[name] = _own_storage(s.values.detach().reshape(-1).to("cpu"), seen)
        shapes[s.key] = list(s.shape)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(shard_file(directory, rank)), metadata={"shapes": json.dumps(shapes)})


class ShardReader:
    """Reads any flat range of any key from the shard files of one checkpoint."""

    def __init__(self, directory: Path) -> None:
        files = sorted(directory.glob("rank_*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{directory} holds no shard files; the checkpoint is incomplete")
        self._handles = [safe_open(str(f), framework="pt") for f in files]
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.pieces: dict[str, list[tuple[int, int, int, str]]] = {}  # key -> [(start, length, file, name)]
        for i, h in enumerate(self._handles):
            for key, shape in json.loads(h.metadata()["shapes"]).items():
                self.shapes[key] = tuple(shape)
            for name in h.keys():  # noqa: SIM118 - safe_open handles are not iterable
                key, start = name.rsplit("@", 1)
                length = h.get_slice(name).get_shape()[0]
                self.pieces.setdefault(key, []).append((int(start), length, i, name))
        for pieces in self.pieces.values():
            pieces.sort()

    def read(self, key: str, start: int, length: int) -> torch.Tensor:
        if key not in self.shapes:
            raise KeyError(key)
        parts, cursor, end = [], start, start + length
        for p_start, p_len, i, name in self.pieces.get(key, []):
            if cursor == end or p_start > cursor:
                break  # done, or a gap (reported below)
            if p_start + p_len <= cursor:
                continue
            hi = min(end, p_start + p_len)
            parts.append(self._handles[i].get_slice(name)[cursor - p_start : hi - p_start])
            cursor = hi
        if cursor != end:
            raise CheckpointError(
                f"checkpoint tensor {key} lacks elements [{cursor}, {end}): a shard file is missing"
            )
        if not parts:
            return torch.empty(0)
        return torch.cat(parts) if len(parts) > 1 else parts[0]


def load_slices(directory: Path, slices: Iterable[LoadSlice]) -> set[str]:
    """Fill every slice from the checkpoint, checking that names and shapes agree; returns the keys of the
    checkpoint that no slice read (on this rank: a ZeRO rank reads only the optimizer states it holds)."""
    reader = ShardReader(directory)
    missing, read = [], set()
    for s in slices:
        if s.key not in reader.shapes:
            missing.append(s.key)
            continue
        if reader.shapes[s.key] != s.shape:
            raise CheckpointError(
                f"checkpoint tensor {s.key} in {directory} has shape {list(reader.shapes[s.key])} but the model "
                f"expects {list(s.shape)}; resume with the model configuration the checkpoint was saved with"
            )
        s.assign(reader.read(s.key, s.start, s.length))
        read.add(s.key)
    if missing:
        raise CheckpointError(
            f"the checkpoint {directory.parent} has no tensor for {len(missing)} name(s) the model or optimizer "
            f"needs: {shown(missing)}; it was saved from another model or optimizer: resume with the configuration "
            "it was saved with, or start afresh (resume=none)"
        )
    return set(reader.shapes) - read


def shown(names: list[str], limit: int = 5) -> str:
    """The first `limit` names, and how many more."""
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
