"""What each strategy holds on a rank and what it sends per step, as data: the planner's view of a strategy
(`python -m trainer.plan`, trainer/plan/). It imports nothing heavy, builds nothing, and is the one place
outside the strategy classes that knows how a strategy spreads the model states; the classes themselves
(fsdp.py, zero.py, ddp.py) are what the layouts describe.

Each layout says which model states are divided over the shard group (the ZeRO paper's partitioning:
optimizer states, gradients, parameters), whether the module computes in a copy of the weights in the compute
dtype, whether DeepSpeed keeps a separate fp32 master copy, which persistent gradient buffers there are, and
which collectives a step runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Layout:
    """One strategy's per-rank memory and its collectives (see trainer/plan/memory.py for how they are used)."""

    name: str
    shards_optim: bool = False
    shards_grads: bool = False
    shards_params: bool = False
    # The weights the forward computes with are a gathered compute-dtype copy per block (FSDP2, ZeRO-3).
    gathers_blocks: bool = False
    # DeepSpeed: the module's weights are stored in the compute dtype (bf16/fp16), fp32 master partitions beside.
    deepspeed: bool = False
    # DDP's C++ reducer: flat gradient buckets the size of the trained gradients, for the whole run.
    gradient_buckets: bool = False
    # DeepSpeed ZeRO-2/3: the gradient partition is a buffer allocated once and kept (contiguous_gradients).
    persistent_grad_buffer: bool = False
    # Collectives of a step, by kind: "all_reduce_grads" (once per step), "reduce_scatter_grads" (per
    # micro-batch), "all_gather_params" (per micro-batch, forward and again in backward), "all_gather_updated"
    # (the updated shards, once per step after the optimizer).
    collectives: tuple[str, ...] = ()
    # The communication runs beside the backward's compute (hooks per bucket or block) rather than after it.
    overlaps: bool = True
    # Runs one process only (strategy=single).
    one_process: bool = False


LAYOUTS: dict[str, Layout] = {
    "single": Layout("single", overlaps=False, one_process=True),
    "ddp": Layout("ddp", gradient_buckets=True, collectives=("all_reduce_grads",)),
    "fsdp": Layout(
        "fsdp",
        shards_optim=True,
        shards_grads=True,
        shards_params=True,
        gathers_blocks=True,
        collectives=("all_gather_params", "reduce_scatter_grads"),
    ),
    "zero1": Layout(
        "zero1",
        shards_optim=True,
        deepspeed=True,
        collectives=("reduce_scatter_grads_at_boundary", "all_gather_updated"),
        overlaps=False,  # DeepSpeed's overlap_comm defaults to off for stages 1 and 2 (our config keeps it)
    ),
    "zero2": Layout(
        "zero2",
        shards_optim=True,
        shards_grads=True,
        deepspeed=True,
        persistent_grad_buffer=True,
        collectives=("reduce_scatter_grads", "all_gather_updated"),
        overlaps=False,
    ),
    "zero3": Layout(
        "zero3",
        shards_optim=True,
        shards_grads=True,
        shards_params=True,
        gathers_blocks=True,
        deepspeed=True,
        persistent_grad_buffer=True,
        collectives=("all_gather_params", "reduce_scatter_grads"),
    ),
}


def strategy_layout(strategy: Any) -> Layout:
    """The layout of a strategy: its name, or the `strategy` group of a composed config."""
    return LAYOUTS[str(strategy if isinstance(strategy, str) else strategy.name)]


def all_layouts() -> list[Layout]:
    """Every strategy's layout, in the config's order (single first)."""
    return list(LAYOUTS.values())
