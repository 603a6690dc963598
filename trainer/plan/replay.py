"""Compute time on this machine's CPU, measured op by op: the training forward and backward of the model cut
to 1 and 2 blocks is traced on fake tensors, each distinct operator call (the operator, its tensors' shapes,
strides and dtypes, its other arguments) recorded with how often it runs; each is then run on real tensors of
those shapes and timed, and a model of L blocks costs the first block plus L - 1 times the second.

Why not FLOPs over the matmul probe: a small model spends a third of its CPU step outside the matmuls
(attention, norms, the elementwise ops of the backward), and its matmuls (K of 128) run at another rate than
the probe's 1024^3. Timing the step's own calls costs about a second for the default model, and needs no
efficiency figure. Only models whose calls materialize (REPLAY_MAX_BYTES per call) and time within
REPLAY_MAX_SECONDS are replayed; larger ones fall back to the roofline.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from trainer.plan.activations import attention_as_run, fake_batch, fake_loss_module

# The most bytes of real tensors one replayed call may allocate: beyond it, the model is too large to time op
# by op here (the planner uses the roofline instead).
REPLAY_MAX_BYTES = 1 << 30
# The most seconds the replay may take before the planner gives up on it for the roofline.
REPLAY_MAX_SECONDS = 60.0


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    dtype: torch.dtype

    @property
    def storage_numel(self) -> int:
        if not all(self.shape):
            return 0
        return self.offset + sum((n - 1) * s for n, s in zip(self.shape, self.stride, strict=True)) + 1

    def materialize(self) -> torch.Tensor:
        storage = torch.empty(max(self.storage_numel, 1), dtype=self.dtype)
        if self.dtype.is_floating_point or self.dtype.is_complex:
            storage.normal_()
        else:
            storage.zero_()  # integer tensors are indices and targets: 0 is valid for every one
        return storage.as_strided(self.shape, self.stride, self.offset)


def _spec(value: Any) -> Any:
    """A hashable description of one argument: tensors by their layout, containers element by element."""
    if isinstance(value, torch.Tensor):
        return TensorSpec(tuple(value.shape), tuple(value.stride()), value.storage_offset(), value.dtype)
    if isinstance(value, torch.device):
        return torch.device("cpu")
    if isinstance(value, (list, tuple)):
        return tuple(_spec(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _spec(v)) for k, v in value.items()))
    return value


def _real(value: Any) -> Any:
    if isinstance(value, TensorSpec):
        return value.materialize()
    if isinstance(value, tuple):
        return tuple(_real(v) for v in value)
    return value


def _bytes(value: Any) -> int:
    if isinstance(value, TensorSpec):
        return value.storage_numel * value.dtype.itemsize
    if isinstance(value, tuple):
        return sum(_bytes(v) for v in value)
    return 0


OpCall = tuple[Any, tuple, tuple]  # (operator, positional argument specs, keyword argument specs)


class OpRecorder(TorchDispatchMode):
    """Counts every operator call that reaches the dispatcher (inside a FakeTensorMode: nothing runs)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[OpCall] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace != "prim":  # prim.device and the like: what a fake tensor asks of itself
            self.calls[(func, _spec(args), _spec(kwargs))] += 1
        return func(*args, **kwargs)


def record_step(
    config: Any,
    num_layers: int,
    *,
    micro_batch: int,
    seq_len: int,
    weight_dtype: torch.dtype,
    autocast_dtype: torch.dtype | None,
    checkpointing: bool,
    loss_chunk_size: int | None,
    document_mask: bool = False,
) -> Counter[OpCall]:
    """The operator calls of one training forward and backward of the model cut to `num_layers` blocks (the
    step activations.trace_block_count traces), counted on fake tensors."""
    shape = dict(weight_dtype=weight_dtype, checkpointing=checkpointing, loss_chunk_size=loss_chunk_size)
    recorder = OpRecorder()
    with fake_loss_module(config, num_layers, **shape) as module, attention_as_run(document_mask):
        batch = fake_batch(micro_batch, seq_len, document_mask=document_mask)
        autocast = torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
        with recorder:
            with autocast:
                loss = module(**batch)
            loss.backward()
    return recorder.calls


def time_call(call: OpCall, *, min_seconds: float = 0.005, max_repeats: int = 50) -> float:
    """Seconds one call takes on real tensors here: the best of at least 3 runs after a warm-up (of one
    more run where the warm-up alone takes over 50 ms)."""
    func, args, kwargs = call
    real_args, real_kwargs = _real(args), dict(_real(kwargs))
    start = time.perf_counter()
    func(*real_args, **real_kwargs)
    if time.perf_counter() - start > 0.05:
        start = time.perf_counter()
        func(*real_args, **real_kwargs)
        return time.perf_counter() - start
    best, runs, start = float("inf"), 0, time.perf_counter()
    while runs < 3 or (time.perf_counter() - start < min_seconds and runs < max_repeats):
        t = time.perf_counter()
        func(*real_args, **real_kwargs)
        best = min(best, time.perf_counter() - t)
        runs += 1
    return best


def call_bytes(call: OpCall) -> int:
    return _bytes(call[1]) + _bytes(call[2])


@dataclass
class ReplayTime:
    """Seconds of one micro-batch's forward and backward on this CPU, and what could not be timed."""

    seconds: float
    calls: int  # operator calls per micro-batch
    failed: int  # calls of operators that would not run on materialized tensors (counted as free)


def replay_seconds(
    one_block: Counter[OpCall], two_blocks: Counter[OpCall], *, num_layers: int, threads: int
) -> ReplayTime | None:
    """Time every distinct call once (with `threads` intra-op threads) and cost the model of `num_layers`
    blocks; None when a call is too large to materialize here."""
    distinct = set(one_block) | set(two_blocks)
    if any(call_bytes(c) > REPLAY_MAX_BYTES for c in distinct):
        return None
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    cost, failed_ops = {}, set()
    start = time.perf_counter()
    try:
        with torch.no_grad():
            for call in distinct:
                if time.perf_counter() - start > REPLAY_MAX_SECONDS:
                    return None
                try:
                    cost[call] = time_call(call)
                except (RuntimeError, ValueError, TypeError, IndexError):
                    cost[call] = 0.0
                    failed_ops.add(call)
    finally:
        torch.set_num_threads(previous)

    def total(calls: Counter[OpCall], pick) -> float:
        return sum(n * pick(c) for c, n in calls.items())

    extra = num_layers - 1

    def per_model(pick) -> float:
        one = total(one_block, pick)
        return one + extra * max(total(two_blocks, pick) - one, 0.0)

    return ReplayTime(
        seconds=per_model(lambda c: cost[c]),
        calls=round(per_model(lambda c: 1)),
        failed=round(per_model(lambda c: c in failed_ops)),
    )
