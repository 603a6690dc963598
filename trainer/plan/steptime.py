"""Step time as a roofline: compute at a measured efficiency of the device's peak, the strategy's collectives
against the links they cross (and how much of them hides behind the backward), and the optimizer step as a
pass over the states at the memory bandwidth.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trainer.plan.devices import COMM_EFFICIENCY, MEASURED_MFU, Device, Network
from trainer.plan.memory import Setup
from trainer.plan.model import ModelCounts
from trainer.plan.replay import ReplayTime

# Our trainer's CPU throughput against the matmul probe (bench/RESULTS.md, "Throughput": 76% on 2 cores).
CPU_MFU = 0.76
# fp32 matmuls without TF32 run on the CUDA cores: 67 of H100's 989 bf16 TFLOPS (data sheet), A100 19.5/312.
FP32_SHARE = 67 / 989
# Activation checkpointing runs each block's forward again in the backward: 8 of the 6 + 2 FLOPs per weight.
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


def plan_step(
    counts: ModelCounts,
    s: Setup,
    dev: Device,
    lk: Links,
    *,
    mfu: float | None,
    on_cpu: bool,
    replayed: ReplayTime | None = None,
) -> StepTime:
    """The step of `s`; `replayed` is one micro-batch's forward and backward timed op by op on this CPU
    (trainer/plan/replay.py), which replaces the FLOPs at an efficiency where given."""
    tokens = s.micro_batch * s.seq_len * s.grad_accum  # per rank per step
    flops = counts.flops_per_token * tokens * (RECOMPUTE if s.checkpointing else 1.0)
    if replayed is not None and not mfu:
        compute = replayed.seconds * s.grad_accum
        eff = flops / (compute * dev.peak_flops)
    else:
        eff = compute_efficiency(s, dev, mfu, on_cpu=on_cpu)
        compute = flops / (dev.peak_flops * eff)
    lay, c, p = s.layout, s.compute_bytes, s.param_bytes
    n = s.shard_degree
    params, trained = counts.num_params, counts.trainable
    grad_bytes = c if lay.deepspeed else (s.reduce_bytes if lay.gathers_blocks else p)
    bw = lk.ring(n, spans_nodes=True)
    volumes: dict[str, float] = {}
    times: dict[str, float] = {}

    def add(name: str, kind: str, size: float, count: float, group: int, bandwidth: float) -> None:
        if group > 1 and count > 0:
            volumes[name] = volumes.get(name, 0.0) + size * count
            times[name] = times.get(name, 0.0) + count * collective_time(kind, size, group, bandwidth)

    micro = s.grad_accum
    for collective in lay.collectives:
        if collective == "all_reduce_grads":
            add(
                "all-reduce (gradients)",
                "all_reduce",
                trained * p,
                1,
                s.world_size,
                lk.ring(s.world_size, spans_nodes=True),
            )
        elif collective == "all_gather_params":
            gathers = 2 if s.reshard_after_forward else 1  # forward, and again in the backward
            add("all-gather (weights)", "all_gather", params * c, micro * gathers, n, bw)
        elif collective in ("reduce_scatter_grads", "reduce_scatter_grads_at_boundary"):
            once = collective.endswith("boundary") or s.defer_grad_sync
            add(
                "reduce-scatter (gradients)",
                "reduce_scatter",
                trained * grad_bytes,
                1 if once else micro,
                n,
                bw,
            )
        elif collective == "all_gather_updated":
            add("all-gather (updated weights)", "all_gather", params * c, 1, n, bw)
    if s.replicate_degree > 1:  # HSDP: the shards' gradients all-reduced across the replicas (across nodes)
        add("all-reduce (replicas)", "all_reduce", trained * grad_bytes / n, 1, s.replicate_degree, lk.inter)
    comm = sum(times.values())
    # Overlapped: hidden behind the compute, but for the first block's gather and the last block's reduce. On
    # a CPU nothing hides: gloo moves the data with the same cores that compute.
    overlaps = lay.overlaps and not on_cpu
    exposed = max(comm - compute, 0.0) + comm / max(counts.num_layers, 1) if overlaps else comm
    # The optimizer step reads and writes the parameters and states and reads the gradients: memory bound.
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
    )
