"""Step time as a roofline: compute at a measured efficiency of the device's peak, the strategy's collectives
against the links they cross (and how much of them hides behind the backward), and the optimizer step as a
pass over the states at the memory bandwidth.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from trainer.plan.devices import COMM_EFFICIENCY, MEASURED_MFU, Device, Network
from trainer.plan.memory import Setup
from trainer.plan.model import ModelCounts
from trainer.plan.replay import ReplayTime

# Our trainer's CPU throughput against the matmul probe (bench/RESULTS.md, "Throughput": 76% on 2 cores).
CPU_MFU = 0.76
# fp32 matmuls without TF32 run on the CUDA cores: 67 of H100's 989 bf16 TFLOPS (data sheet), A100 19.5/312.
FP32_SHARE = 67 / 989
# DDP's gradient buckets (DistributedDataParallel's bucket_cap_mb default: 25 MiB).
DDP_BUCKET_BYTES = 25 * 2**20
# Full activation checkpointing runs each block's forward again in the backward: 8 of the 6 + 2 FLOPs per
# weight. (Selective repeats no matmul: its recomputed ops are costed by the bytes they move.)
RECOMPUTE = 8 / 6


@dataclass
class Links:
    """Bandwidths one rank's collectives see, in bytes/s (efficiency applied)."""

    intra: float
    inter: float
    nodes: int
    gpus_per_node: int

    def ring(self, group: int, *, spans_nodes: bool) -> float:
        """The bandwidth of a ring over `group` ranks: the slowest link it crosses."""
        return self.inter if spans_nodes and self.nodes > 1 and group > self.gpus_per_node else self.intra


def links(
    dev: Device, net: Network, *, nodes: int, gpus_per_node: int, intra: float | None, inter: float | None
) -> Links:
    inter_bw = (
        inter if inter else (net.bytes_per_s / gpus_per_node if net.shared_by_node else net.bytes_per_s)
    )
    return Links(
        intra=(intra or dev.intra_node_bytes_per_s) * COMM_EFFICIENCY,
        inter=inter_bw * COMM_EFFICIENCY,
        nodes=nodes,
        gpus_per_node=gpus_per_node,
    )


@dataclass
class StepTime:
    compute_s: float
    comm_s: float  # every collective's time, as if alone
    exposed_comm_s: float  # what the backward does not hide
    optimizer_s: float
    volumes: dict[str, float] = field(default_factory=dict)  # bytes each rank sends per step, by collective
    mfu_used: float = 0.0
    replayed: ReplayTime | None = None  # the compute timed op by op on this CPU
    comm_timed_here: bool = False  # each collective call timed on this machine's gloo
    recompute_s: float = 0.0  # selective checkpointing's recomputed ops, in compute_s

    @property
    def step_s(self) -> float:
        return self.compute_s + self.exposed_comm_s + self.optimizer_s


def compute_efficiency(s: Setup, dev: Device, mfu: float | None, *, on_cpu: bool) -> float:
    """Model FLOP/s as a share of the bf16 peak: plan.mfu, or our measured MFU for the precision and compile."""
    if mfu:
        return mfu
    if on_cpu:
        return CPU_MFU
    if s.precision == "fp32":
        return MEASURED_MFU[("bf16", s.compile)] * FP32_SHARE
    return MEASURED_MFU[("fp8" if s.precision == "fp8" else "bf16", s.compile)]


def collective_time(kind: str, size: float, group: int, bandwidth: float) -> float:
    """A ring collective over `group` ranks of `size` bytes (the whole tensor): each rank moves (n-1)/n of it,
    twice for an all-reduce (reduce-scatter then all-gather)."""
    if group <= 1:
        return 0.0
    factor = 2.0 if kind == "all_reduce" else 1.0
    return factor * size * (group - 1) / group / bandwidth


@dataclass
class CollectiveCall:
    """One collective of a step: `count` times per step, as separate calls of `sizes` bytes each (the whole
    tensor, as collective_time takes it) over `group` ranks."""

    name: str
    kind: str  # all_reduce, all_gather, reduce_scatter
    sizes: list[float]
    count: float
    group: int
    bandwidth: float


def collective_calls(counts: ModelCounts, s: Setup, lk: Links) -> list[CollectiveCall]:
    """The strategy's collectives in one step, as the calls it makes: FSDP2 and ZeRO-3 one per block (and
    one for the root) per gather and reduce-scatter, DDP one per 25 MiB bucket, ZeRO-1/2 one per step."""
    lay, c, p = s.layout, s.compute_bytes, s.param_bytes
    n, micro = s.shard_degree, s.grad_accum
    params, trained = counts.num_params, counts.trainable
    grad_bytes = c if lay.deepspeed else (s.reduce_bytes if lay.gathers_blocks else p)
    bw = lk.ring(n, spans_nodes=True)
    blocks = [counts.root_params] + [counts.block_params] * counts.num_layers
    share = trained / params if params else 1.0  # of each unit's parameters, those with gradients

    def units(bytes_per_param: float, *, trained_only: bool) -> list[float]:
        return [b * bytes_per_param * (share if trained_only else 1.0) for b in blocks if b]

    calls = []
    for collective in lay.collectives:
        if collective == "all_reduce_grads":
            total = trained * p
            buckets = max(math.ceil(total / DDP_BUCKET_BYTES), 1)
            ring = lk.ring(s.world_size, spans_nodes=True)
            calls.append(
                CollectiveCall(
                    "all-reduce (gradients)", "all_reduce", [total / buckets] * buckets, 1, s.world_size, ring
                )
            )
        elif collective == "all_gather_params":
            gathers = 2 if s.reshard_after_forward else 1  # forward, and again in the backward
            sizes = units(c, trained_only=False)
            if s.fp8_all_gather:
                # each block's linears in float8 (1 byte), the rest of it in the compute dtype
                linear = counts.linear_block_weights / counts.num_layers
                sizes = [sizes[0]] + [(counts.block_params - linear) * c + linear] * counts.num_layers
            calls.append(CollectiveCall("all-gather (weights)", "all_gather", sizes, micro * gathers, n, bw))
        elif collective in ("reduce_scatter_grads", "reduce_scatter_grads_at_boundary"):
            once = collective.endswith("boundary") or s.defer_grad_sync
            sizes = units(grad_bytes, trained_only=True) if lay.gathers_blocks else [trained * grad_bytes]
            calls.append(
                CollectiveCall(
                    "reduce-scatter (gradients)", "reduce_scatter", sizes, 1 if once else micro, n, bw
                )
            )
        elif collective == "all_gather_updated":
            calls.append(CollectiveCall("all-gather (updated weights)", "all_gather", [params * c], 1, n, bw))
    if s.replicate_degree > 1:  # HSDP: the shards' gradients all-reduced across the replicas (across nodes)
        size = trained * grad_bytes / n
        calls.append(
            CollectiveCall("all-reduce (replicas)", "all_reduce", [size], 1, s.replicate_degree, lk.inter)
        )
    return [call for call in calls if call.group > 1 and call.count > 0]


def plan_step(
    counts: ModelCounts,
    s: Setup,
    dev: Device,
    lk: Links,
    *,
    mfu: float | None,
    on_cpu: bool,
    replayed: ReplayTime | None = None,
    measured: Callable[[str, float], float] | None = None,
    recomputed_bytes: float = 0.0,
) -> StepTime:
    """The step of `s`; `replayed` is one micro-batch's forward and backward timed op by op on this CPU
    (trainer/plan/replay.py), which replaces the FLOPs at an efficiency where given; `measured` gives the
    seconds of one collective call (kind, bytes) timed on this machine, instead of the ring formula;
    `recomputed_bytes` is what selective checkpointing's recomputed ops move per micro-batch (at the memory
    bandwidth, on top of the FLOPs: the replay has them already)."""
    tokens = s.micro_batch * s.seq_len * s.grad_accum  # per rank per step
    flops = counts.flops_per_token * tokens * (RECOMPUTE if s.checkpointing is True else 1.0)
    recompute = 0.0
    if replayed is not None and not mfu:
        compute = replayed.seconds * s.grad_accum
        eff = flops / (compute * dev.peak_flops)
    else:
        eff = compute_efficiency(s, dev, mfu, on_cpu=on_cpu)
        recompute = recomputed_bytes * s.grad_accum / dev.hbm_bytes_per_s
        compute = flops / (dev.peak_flops * eff) + recompute
    lay, c, p = s.layout, s.compute_bytes, s.param_bytes
    n = s.shard_degree
    grad_bytes = c if lay.deepspeed else (s.reduce_bytes if lay.gathers_blocks else p)
    volumes: dict[str, float] = {}
    times: dict[str, float] = {}
    for call in collective_calls(counts, s, lk):
        volumes[call.name] = volumes.get(call.name, 0.0) + sum(call.sizes) * call.count
        if measured is not None:
            seconds = sum(measured(call.kind, size) for size in call.sizes)
        else:
            seconds = collective_time(call.kind, sum(call.sizes), call.group, call.bandwidth)
        times[call.name] = times.get(call.name, 0.0) + call.count * seconds
    comm = sum(times.values())
    # Overlapped: hidden behind the compute, but for the first block's gather and the last block's reduce. On
    # a CPU nothing hides: gloo moves the data with the same cores that compute.
    overlaps = lay.overlaps and not on_cpu
    exposed = max(comm - compute, 0.0) + comm / max(counts.num_layers, 1) if overlaps else comm
    # The optimizer step reads and writes the parameters and states and reads the gradients: memory bound.
    trained = counts.trainable
    stepped = trained / (n if lay.shards_optim else 1)
    state_bytes = s.optimizer_bytes if not lay.deepspeed else s.optimizer_bytes / p * 4
    touched = stepped * (2 * (4 if lay.deepspeed else p) + grad_bytes + 2 * state_bytes)
    optimizer = touched / dev.hbm_bytes_per_s
    return StepTime(
        compute_s=compute,
        comm_s=comm,
        exposed_comm_s=exposed,
        optimizer_s=optimizer,
        volumes=volumes,
        mfu_used=eff,
        replayed=replayed if replayed is not None and not mfu else None,
        comm_timed_here=measured is not None and bool(times),
        recompute_s=recompute,
    )
