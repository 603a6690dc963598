"""FSDP2 (`fully_shard`): parameters, gradients and optimizer states sharded by rows over the ranks.

Each transformer block is its own FSDP unit (all-gathered just before it runs, freed after), then the
root takes what is left (embeddings, final norm, LM head). With `strategy.replicate_degree > 1` the mesh
is 2-D, HSDP: parameters are sharded within groups of world / replicate ranks (a node) and replicated
across groups.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from trainer.errors import ConfigError
from trainer.models import transformer_blocks
from trainer.precision import convert_to_fp8
from trainer.shards import LoadSlice, SaveSlice
from trainer.strategies.base import OptimizerFactory, Piece, Strategy, named_parameters


def _row_offset(t: DTensor) -> tuple[int, bool]:
    """Flat start of this rank's shard, and whether this rank writes it (first replica on replicated mesh dims)."""
    for p in t.placements:
        if not isinstance(p, (Shard, Replicate)) or (isinstance(p, Shard) and p.dim != 0):
            raise ValueError(
                f"unsupported placement {t.placements} for a checkpoint; expected Shard(0)/Replicate"
            )
    _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    coords = t.device_mesh.get_coordinate() or []
    writer = all(c == 0 for c, p in zip(coords, t.placements, strict=True) if isinstance(p, Replicate))
    row = t.numel() // t.shape[0] if t.ndim else 1
    return (offset[0] * row if t.ndim else 0), writer


def plain_tensor(t: torch.Tensor) -> torch.Tensor:
    """The plain tensor inside a wrapper subclass holding one (torchao's float8 weight, whose values are the
    bf16/fp32 weight's: precision.fp8_all_gather), so that checkpoints read and write its storage; any other
    tensor as it is."""
    if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):
        inner, _ = t.__tensor_flatten__()
        if inner == ["_tensor"]:
            return plain_tensor(t._tensor)
    return t


@contextlib.contextmanager
def gathered_root(module: nn.Module) -> Iterator[None]:
    """An FSDP2 root's own parameters (those outside its per-block units) gathered while the context lasts."""
    if not isinstance(module, FSDPModule):
        yield
        return
    module.unshard()
    try:
        yield
    finally:
        module.reshard()


def local_numel(module: nn.Module) -> int:
    """Parameter elements this rank holds of a module whose parameters may be DTensor shards."""
    return sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in module.parameters())


def shard_frozen(
    module: nn.Module,
    *,
    mesh: DeviceMesh,
    param_dtype: torch.dtype | None = None,
    offload_policy: OffloadPolicy | None = None,
) -> nn.Module:
    """FSDP2 shards of a frozen module that holds an HF model as `.model` (each block a unit, the root the rest).

    Every unit reshards after its forward, the root too: between forwards a rank holds only its shards.
    fully_shard moves each unit to the mesh's device and shards it, one unit after the other: the whole module
    never has to fit on one device (a block at a time does).
    """
    module.requires_grad_(False).eval()
    kwargs = dict(
        mesh=mesh,
        mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype),
        offload_policy=offload_policy or OffloadPolicy(),
        reshard_after_forward=True,
    )
    for block in transformer_blocks(module.model):
        fully_shard(block, **kwargs)
    fully_shard(module, **kwargs)
    return module


class FSDPStrategy(Strategy):
    name = "fsdp"
    one_process = False
    replicated = False
    dtensor_parameters = True

    def __init__(self, cfg: Any, env, device) -> None:
        super().__init__(cfg, env, device)
        if env.world_size % self.cfg.replicate_degree:
            raise ConfigError(
                f"strategy.replicate_degree={self.cfg.replicate_degree} does not divide the world size {env.world_size}; "
                "use the number of nodes (HSDP) or 1 (plain FSDP)"
            )

        if self.cfg.cpu_offload and device.type != "cuda":
            raise ConfigError(
                "strategy.cpu_offload=true moves FSDP shards between CPU memory and the GPU for compute; "
                "this run is on the CPU, where the shards already live: set strategy.cpu_offload=false"
            )

    def build_mesh(self) -> DeviceMesh:
        r = self.cfg.replicate_degree
        if r == 1:
            return init_device_mesh(self.device.type, (self.env.world_size,), mesh_dim_names=("shard",))
        return init_device_mesh(
            self.device.type, (r, self.env.world_size // r), mesh_dim_names=("replicate", "shard")
        )

    def setup(
        self, module: nn.Module, make_optimizer: OptimizerFactory
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        module = module.to(self.device)
        if self.precision.fp8:
            convert_to_fp8(module, self.precision.fp8_recipe, all_gather=self.precision.fp8_all_gather)
        self.precision.make_scaler(sharded=True)  # fp16: the overflow flag is all-reduced over the shards
        mesh = self.build_mesh()
        offload: OffloadPolicy = CPUOffloadPolicy() if self.cfg.cpu_offload else OffloadPolicy()
        # Parameters gathered in the compute dtype, gradients reduced in reduce_dtype, shards kept as stored.
        policy = MixedPrecisionPolicy(
            param_dtype=self.precision.compute_dtype, reduce_dtype=self.precision.reduce_dtype
        )
        kwargs = dict(mesh=mesh, offload_policy=offload, mp_policy=policy)
        for block in transformer_blocks(module.model):
            fully_shard(block, reshard_after_forward=self.cfg.reshard_after_forward, **kwargs)
        # The root's parameters (embeddings, head) are used again right after the forward: keep them gathered.
        fully_shard(module, reshard_after_forward=False, **kwargs)
        return module, make_optimizer(module)

    def prepare_frozen(self, module: nn.Module) -> nn.Module:
        """Sharded like the student (per block, same mesh and precision policy), for inference only."""
        offload: OffloadPolicy = CPUOffloadPolicy() if self.cfg.cpu_offload else OffloadPolicy()
        return shard_frozen(
            module, mesh=self.build_mesh(), param_dtype=self.precision.compute_dtype, offload_policy=offload
        )

    def gathered(self, module: nn.Module) -> contextlib.AbstractContextManager:
        return gathered_root(module)

    def forward_context(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # the MixedPrecisionPolicy casts the gathered parameters

    def accumulation_context(self, module: nn.Module, *, sync: bool) -> contextlib.AbstractContextManager:
        # Reduce-scattering every micro-batch keeps gradients sharded (ZeRO-2/3 do the same); deferring it
        # saves traffic but holds each rank's whole unsharded gradient until the last micro-batch.
        module.set_requires_gradient_sync(sync or not self.cfg.defer_grad_sync)
        return contextlib.nullcontext()

    def clip_and_step(
        self, module: nn.Module, optimizer: torch.optim.Optimizer, max_norm: float, *, skip: bool = False
    ) -> torch.Tensor:
        norm = super().clip_and_step(module, optimizer, max_norm, skip=skip)
        if self.precision.fp8_all_gather:
            # The updated weights' float8 scales, for the next gathers: one all-reduce for every weight's amax
            # (each gather would otherwise all-reduce its own).
            from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

            precompute_float8_dynamic_scale_for_fsdp(module)
        return norm

    def _full_norm(self, norm: torch.Tensor) -> torch.Tensor:
        return norm.full_tensor() if isinstance(norm, DTensor) else norm

    @staticmethod
    def _reshard(module: nn.Module) -> None:
        """Put every parameter back in its sharded form: the root stays gathered between forward and step."""
        for m in module.modules():
            if isinstance(m, FSDPModule):
                m.reshard()

    def save_slices(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> list[SaveSlice]:
        self._reshard(module)
        return super().save_slices(module, optimizer)

    def load_slices(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> list[LoadSlice]:
        self._reshard(module)
        return super().load_slices(module, optimizer)

    def pieces(self, module: nn.Module, optimizer: torch.optim.Optimizer, names: set[str]) -> list[Piece]:
        self._reshard(module)  # after an eval forward the root's parameters are still gathered
        return super().pieces(module, optimizer, names)

    def _local(self, tensor: torch.Tensor) -> tuple[int, torch.Tensor, bool]:
        if not isinstance(tensor, DTensor):
            return super()._local(tensor)
        start, writer = _row_offset(tensor)
        return start, plain_tensor(tensor.to_local()), writer

    def _save(self, key: str, tensor: torch.Tensor) -> list[SaveSlice]:
        if not isinstance(tensor, DTensor):
            return super()._save(key, tensor)
        start, local, writer = self._local(tensor)
        if not writer or local.numel() == 0:
            return []
        return [SaveSlice(key, tuple(tensor.shape), start, local.detach().reshape(-1))]

    def _load(self, key: str, tensor: torch.Tensor) -> list[LoadSlice]:
        if not isinstance(tensor, DTensor):
            return super()._load(key, tensor)
        start, local, _ = self._local(tensor)

        def assign(values: torch.Tensor) -> None:
            with torch.no_grad():
                local.copy_(values.view(local.shape).to(local.dtype))

        return [LoadSlice(key, tuple(tensor.shape), start, local.numel(), assign)]

    def full_state_dict(self, module: nn.Module) -> dict[str, torch.Tensor]:
        self._reshard(module)
        out = {}
        for name, p in named_parameters(module):
            full = _full_tensor(p) if isinstance(p, DTensor) else p  # a collective: every rank takes part
            if self.env.is_main:
                out[name] = full.detach().cpu()
        return out


def _full_tensor(param: DTensor) -> torch.Tensor:
    """The whole of a sharded parameter. A quantized shard (torchao's NF4Tensor, a QLoRA base) is dequantized
    first and gathered as a plain tensor: gathering the NF4Tensor itself goes through torchao's handlers of the
    functional all-gather, which corrupted the heap under gloo about once in twenty 2-rank runs (glibc's
    "malloc(): unaligned tcache chunk detected", then SIGABRT). The whole weight is the same either way: the
    shards are whole NF4 blocks, dequantized exactly as the gathered tensor would be."""
    local = param.to_local()
    if not hasattr(local, "get_original_weight"):
        return plain_tensor(param.full_tensor())
    dense = DTensor.from_local(
        local.get_original_weight(),
        param.device_mesh,
        param.placements,
        run_check=False,
        shape=param.shape,
        stride=param.stride(),
    )
    return dense.full_tensor()
