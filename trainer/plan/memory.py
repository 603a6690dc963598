"""Peak memory per rank of one training job: the model states the strategy's layout holds
(trainer/strategies/layout.py), the buffers its collectives use, and the activations traced on fake tensors
(trainer/plan/activations.py), at the two moments a step peaks: the start of the backward (activations
all held) and the optimizer step (every gradient held).

Bytes per parameter follow the ZeRO paper's accounting, with our trainer's choices: parameters and their
gradients in `train.dtype` (P bytes), optimizer states in it too (K bytes per parameter: AdamW 2P, Lion and
SGD-with-momentum P), the compute dtype's copies (C bytes) where a strategy gathers or DeepSpeed stores them,
and DeepSpeed's separate fp32 master partition when the module computes in 16 bits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from trainer.activation_checkpointing import Mode
from trainer.plan.activations import ActivationTrace, StepShape, trace_activations
from trainer.plan.model import ModelCounts
from trainer.strategies.layout import Layout
from trainer.utils import resolve_dtype

# Optimizer states per trained parameter, in units of the parameter's dtype (the class `_target_` names).
_STATES = {"AdamW": 2, "Adam": 2, "FusedAdam": 2, "FusedLAMB": 2, "DeepSpeedCPUAdam": 2, "Lion": 1}
# bitsandbytes' 8-bit AdamW: two moments of one byte each (plus a scale per 2048-value block, negligible).
_BYTES_8BIT = 2.0
# Compute dtype bytes by precision (fp8 keeps bf16 activations and gathers: torchao casts inside each matmul).
COMPUTE_BYTES = {"fp32": None, "bf16": 2, "fp16": 2, "fp8": 2}


def optimizer_state_bytes(opt: Any, param_bytes: int) -> float:
    """Bytes of optimizer state per trained parameter."""
    name = str(opt._target_).rsplit(".", 1)[-1]
    if "8bit" in name.lower():
        return _BYTES_8BIT
    if name == "SGD":
        return param_bytes if float(opt.get("momentum", 0.0) or 0.0) > 0 else 0.0
    if name == "Adafactor":
        return 0.0  # a row and a column per matrix: small next to the matrix
    return _STATES.get(name, 2) * param_bytes


@dataclass
class Setup:
    """What the plan is for: one strategy, micro-batch and checkpointing choice, on `world_size` ranks."""

    layout: Layout
    world_size: int
    micro_batch: int
    seq_len: int
    grad_accum: int
    checkpointing: Mode  # False, "selective" or True
    compile: bool
    precision: str
    param_bytes: int
    reduce_bytes: int
    optimizer_bytes: float  # per trained parameter
    foreach_optimizer: bool  # torch's multi-tensor step (CPU): a temporary the size of the parameters
    reshard_after_forward: bool = True
    defer_grad_sync: bool = False
    replicate_degree: int = 1
    fsdp_cpu_offload: bool = False
    offload_optimizer: bool = False
    offload_params: bool = False
    loss_chunk_size: int | None = None
    # Restarting positions per document (conversations, data.document_mask): attention under a block mask.
    document_positions: bool = False
    # precision.fp8_all_gather: FSDP2 gathers the blocks' float8 linears' weights in 1 byte each.
    fp8_all_gather: bool = False

    @property
    def compute_bytes(self) -> int:
        return COMPUTE_BYTES.get(self.precision) or self.param_bytes

    @property
    def shard_degree(self) -> int:
        return max(self.world_size // max(self.replicate_degree, 1), 1)


@dataclass
class MemoryPlan:
    """Bytes per rank, by part; `peak` is the larger of the backward's and the optimizer step's."""

    parts: dict[str, float] = field(default_factory=dict)
    activations: ActivationTrace | None = None
    activations_checkpointed: ActivationTrace | None = None
    backward_peak: float = 0.0
    step_peak: float = 0.0
    fragmentation: float = 0.0
    host_bytes: float = 0.0  # offloaded states, in CPU memory

    @property
    def allocated(self) -> float:
        """The most tensors hold at once (what torch.cuda.max_memory_allocated measures)."""
        return max(self.backward_peak, self.step_peak)

    @property
    def peak(self) -> float:
        """With the fragmentation margin: what the device must have."""
        return self.allocated * (1 + self.fragmentation)


def model_states(
    counts: ModelCounts, s: Setup, *, teacher: int = 0, masked: bool = False
) -> dict[str, float]:
    """Parameters, gradients, optimizer states, DeepSpeed's master partition, masks and teacher, per rank."""
    lay, n = s.layout, s.shard_degree
    trained, frozen_bytes = counts.trainable, counts.frozen_bytes
    if not counts.frozen_bytes and trained == counts.num_params:
        frozen_bytes = 0.0
    p, c = s.param_bytes, s.compute_bytes
    sixteen_bit = lay.deepspeed and c < p
    stored = c if sixteen_bit else p  # DeepSpeed stores the module's weights in the compute dtype
    params = trained * stored + frozen_bytes
    grads = trained * stored
    master = trained * 4.0 if sixteen_bit else 0.0  # fp32 partitions beside bf16 weights
    optim = trained * (s.optimizer_bytes if not lay.deepspeed else s.optimizer_bytes / p * 4)
    if lay.shards_params:
        params /= n
    if lay.shards_grads:
        grads /= n
    if lay.shards_optim:
        optim /= n
        master /= n
    states = {
        "parameters": params,
        "gradients": grads,
        "optimizer states": optim,
        "fp32 master": master,
        "masks": float(counts.linear_block_weights) if masked else 0.0,  # bool masks, whole on every rank
        "teacher": teacher * p / (n if lay.shards_params else 1),
    }
    offloaded = 0.0
    if s.fsdp_cpu_offload and lay.gathers_blocks and not lay.deepspeed:
        offloaded = params + grads + optim
        states |= {"parameters": 0.0, "gradients": 0.0, "optimizer states": 0.0}
    if s.offload_optimizer and lay.deepspeed:
        offloaded += optim + master
        states |= {"optimizer states": 0.0, "fp32 master": 0.0}
    if s.offload_params and lay.shards_params and lay.deepspeed:
        offloaded += states["parameters"]
        states["parameters"] = 0.0
    states["offloaded to CPU"] = offloaded
    return states


def buffers(counts: ModelCounts, s: Setup) -> dict[str, float]:
    """What the strategy's collectives and gathers hold besides the states: gathered compute-dtype blocks,
    unsharded gradients before their reduce-scatter, DDP's buckets, DeepSpeed's reduce bucket."""
    lay, c, r = s.layout, s.compute_bytes, s.reduce_bytes
    block = counts.block_params
    gathered, grad_buffers = 0.0, 0.0
    if lay.gathers_blocks and not lay.deepspeed:  # FSDP2: the root stays gathered; blocks two at a time
        blocks_held = 2 if s.reshard_after_forward else counts.num_layers
        gathered = counts.root_params * c + blocks_held * block * c
        grad_buffers = (counts.num_layers if s.defer_grad_sync and s.grad_accum > 1 else 2) * block * r
    elif lay.gathers_blocks:  # ZeRO-3: the current block and the prefetch bucket (0.9 hidden^2 elements)
        gathered = (block + 0.9 * counts.hidden_size**2) * c
        grad_buffers = counts.hidden_size**2 * c  # the reduce bucket (trainer/strategies/zero.py)
    elif lay.deepspeed:
        grad_buffers = counts.hidden_size**2 * c  # the reduce bucket, filled and freed in the backward
    if lay.gradient_buckets:
        grad_buffers = counts.trainable * s.param_bytes
    return {"gathered weights": gathered, "communication buffers": grad_buffers}


def plan_memory(
    counts: ModelCounts,
    s: Setup,
    *,
    fragmentation: float,
    teacher: int = 0,
    masked: bool = False,
    trace: ActivationTrace | None = None,
) -> MemoryPlan:
    """The peak per rank of `s`; `trace` reuses activations already traced for the same shapes."""
    states = model_states(counts, s, teacher=teacher, masked=masked)
    bufs = buffers(counts, s)
    acts = trace or activations_for(counts, s)
    held = sum(v for k, v in states.items() if k not in ("gradients", "offloaded to CPU"))
    # Gradients exist during the forward and backward only when accumulated over micro-batches or kept in
    # a buffer allocated once (DeepSpeed's partition); otherwise the previous step freed them (set_to_none)
    # and the backward's peak holds the share the trace found computed by then.
    accumulated = s.grad_accum > 1 or s.layout.persistent_grad_buffer
    grads_in_backward = states["gradients"] * (1.0 if accumulated else acts.grad_share_at_peak)
    backward = held + grads_in_backward + sum(bufs.values()) + acts.peak
    # The step: every gradient, plus what it allocates: DeepSpeed's fp32 gradient partition in 16 bits,
    # torch's multi-tensor (foreach) temporaries the size of the parameters.
    step_temp = states["fp32 master"] if states["fp32 master"] else 0.0
    if s.foreach_optimizer and not s.layout.deepspeed:
        step_temp = states["parameters"]
    step = (
        held
        + states["gradients"]
        + step_temp
        + (bufs["communication buffers"] if s.layout.gradient_buckets else 0)
    )
    parts = {**states, **bufs, "activations (at the peak)": acts.peak}
    parts["gradients"] = states["gradients"]
    return MemoryPlan(
        parts=parts,
        activations=acts,
        backward_peak=backward,
        step_peak=step,
        fragmentation=fragmentation,
        host_bytes=states["offloaded to CPU"],
    )


def activations_for(counts: ModelCounts, s: Setup) -> ActivationTrace:
    """Trace the activations as the strategy computes (see trainer/plan/activations.py)."""
    return trace_activations(counts.config, counts.num_layers, step_shape(s), **compile_arrangement(s))


def step_shape(s: Setup, *, micro_batch: int | None = None) -> StepShape:
    """The micro-batch's forward and backward of `s` as the fake step traces it (at `micro_batch` if given)."""
    weight_dtype, autocast = trace_dtypes(s)
    return StepShape(
        micro_batch=micro_batch or s.micro_batch,
        seq_len=s.seq_len,
        weight_dtype=weight_dtype,
        autocast_dtype=autocast,
        checkpointing=s.checkpointing,
        loss_chunk_size=s.loss_chunk_size,
        document_mask=s.document_positions,
    )


def compile_arrangement(s: Setup) -> dict[str, bool]:
    """How a compiled step is traced: float8 linears with precision=fp8, a graph per block under FSDP2 (its
    hooks break the graph); nothing for an eager one (eager float8 saves bf16 inputs: traced as bf16)."""
    if not s.compile:
        return {}
    fsdp2 = s.layout.gathers_blocks and not s.layout.deepspeed
    return {"compiled": True, "fp8": s.precision == "fp8", "split_blocks": fsdp2}


def trace_dtypes(s: Setup) -> tuple[torch.dtype, torch.dtype | None]:
    """(weights' dtype, autocast dtype) of the forward as the strategy runs it."""
    compute = {2: torch.bfloat16 if s.precision != "fp16" else torch.float16, 4: torch.float32}
    stored = {2: torch.bfloat16, 4: torch.float32}[s.param_bytes]
    if s.compute_bytes == s.param_bytes:
        return stored, None
    if s.layout.gathers_blocks or s.layout.deepspeed:
        return compute[s.compute_bytes], None  # FSDP2's gathered copy, DeepSpeed's 16-bit module
    return stored, compute[s.compute_bytes]  # single, ddp: autocast


def setup_from_config(cfg: Any, layout: Layout, *, world_size: int, foreach: bool) -> Setup:
    """The Setup of a composed training config on `world_size` ranks."""
    t, st = cfg.train, cfg.strategy
    param_bytes = resolve_dtype(t.dtype).itemsize
    return Setup(
        layout=layout,
        world_size=world_size,
        micro_batch=int(t.micro_batch_size),
        seq_len=int(cfg.data.seq_len),
        grad_accum=max(int(t.global_batch_size) // (int(t.micro_batch_size) * world_size), 1),
        checkpointing=t.activation_checkpointing,
        compile=bool(t.compile),
        precision=str(cfg.precision.name),
        param_bytes=param_bytes,
        reduce_bytes=resolve_dtype(cfg.precision.reduce_dtype).itemsize,
        optimizer_bytes=optimizer_state_bytes(cfg.optimizer, param_bytes),
        foreach_optimizer=foreach,
        reshard_after_forward=bool(st.reshard_after_forward),
        defer_grad_sync=bool(st.defer_grad_sync),
        replicate_degree=int(st.replicate_degree),
        fsdp_cpu_offload=bool(st.cpu_offload),
        offload_optimizer=str(st.offload_optimizer) == "cpu",
        offload_params=str(st.offload_params) == "cpu",
        loss_chunk_size=t.loss_chunk_size,
        # as trainer/data/windows.py: conversations always, text packed with data.document_mask
        document_positions=str(cfg.data.get("format", "text")) != "text"
        or bool(cfg.data.get("packing") and cfg.data.get("document_mask")),
        fp8_all_gather=bool(cfg.precision.fp8_all_gather),
    )
