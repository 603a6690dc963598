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
import dataclasses
import math
import multiprocessing
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from trainer.plan.activations import StepShape, attention_as_run, fake_batch, fake_loss_module

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
            storage.uniform_(-1.0, 1.0)
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


def _bytes(value: Any, numel: Callable[[TensorSpec], int] = lambda t: t.storage_numel) -> int:
    """Bytes of the tensors in `value` (an argument spec, nested in tuples), each `numel(spec)` elements: its
    storage's extent by default (what materializing it allocates)."""
    if isinstance(value, TensorSpec):
        return numel(value) * value.dtype.itemsize
    if isinstance(value, tuple):
        return sum(_bytes(v, numel) for v in value)
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


def record_step(config: Any, num_layers: int, step: StepShape) -> Counter[OpCall]:
    """The operator calls of one training forward and backward of the model cut to `num_layers` blocks (the
    step activations.trace_block_count traces), counted on fake tensors."""
    recorder = OpRecorder()
    with fake_loss_module(config, num_layers, step) as module, attention_as_run(step.document_mask):
        batch = fake_batch(step)
        with recorder:
            with step.autocast():
                loss = module(**batch)
            loss.backward()
    return recorder.calls


def recomputed_bytes(config: Any, step: StepShape) -> float:
    """Bytes one block's recomputed ops read and write in a selectively checkpointed step (step.checkpointing
    == "selective"): the calls the step makes beyond those of the same step without checkpointing (the cheap
    ops between matmuls, run again in the backward), each counted as its inputs read and as much written.
    Views (and `_unsafe_view`, a view without the annotation) move nothing and are not counted. On a GPU
    these ops are bound by memory bandwidth."""
    again = record_step(config, 1, step) - record_step(
        config, 1, dataclasses.replace(step, checkpointing=False)
    )
    moved = [
        (call, n)
        for call, n in again.items()
        if not call[0].is_view and call[0] is not torch.ops.aten._unsafe_view.default
    ]
    return float(sum(2 * _bytes(call[1], lambda t: math.prod(t.shape)) * n for call, n in moved))


def run_once(call: OpCall) -> float:
    """Seconds of one run of `call` on freshly made tensors: in a step an operator reads what the one before
    it just wrote, not inputs it has read a hundred times (hot in the cache, the default model's matmuls run
    ~8% faster)."""
    func, args, kwargs = call
    real_args, real_kwargs = _real(args), dict(_real(kwargs))
    start = time.perf_counter()
    func(*real_args, **real_kwargs)
    return time.perf_counter() - start


def call_bytes(call: OpCall) -> int:
    return _bytes(call[1]) + _bytes(call[2])


@dataclass
class ReplayTime:
    """Seconds of one micro-batch's forward and backward on this CPU, and what could not be timed."""

    seconds: float
    calls: int  # operator calls per micro-batch
    failed: int  # calls of operators that would not run on materialized tensors (counted as free)
    overhead_per_call: float = 0.0  # seconds the framework adds to each call (in `seconds`)
    ranks: int = 1  # processes that timed the calls at once (the ranks sharing this machine)


def time_calls(
    calls: set[OpCall] | list[OpCall], *, deadline: float, rounds: int = 7
) -> tuple[dict[OpCall, float], set[OpCall]] | None:
    """Each call's seconds, the median of `rounds` runs after a warm-up, in rounds over all the calls (so
    that a moment when the machine is busy touches one run of many calls, not every run of one); a call
    whose warm-up takes over 50 ms runs once more only. Also the calls that would not run (costed 0); None
    past `deadline`."""
    times: dict[OpCall, list[float]] = {}
    failed = set()
    with torch.no_grad():
        for round_ in range(rounds + 1):
            for call in calls:
                if time.perf_counter() > deadline:
                    return None
                if call in failed or (round_ > 1 and times[call][0] > 0.05):
                    continue
                try:
                    seconds = run_once(call)
                except (RuntimeError, ValueError, TypeError, IndexError):
                    failed.add(call)
                    continue
                times.setdefault(call, []).append(seconds)
    cost = {call: sorted(t[1:])[(len(t) - 1) // 2] if len(t) > 1 else t[0] for call, t in times.items()}
    return cost | dict.fromkeys(failed, 0.0), failed


def overhead_per_call(step: StepShape, config: Any, *, deadline: float) -> float | None:
    """Seconds a real step spends per operator call beyond the call itself (the model's Python code,
    autograd recording the graph and running the backward): a real step of the model cut to 1 block on one
    sequence of 16 tokens, its kernels next to nothing, timed, less the replay of its own calls, over their
    number."""
    small = dataclasses.replace(step, micro_batch=1, seq_len=min(16, step.seq_len))
    calls = record_step(config, 1, small)
    timed = time_calls(set(calls), deadline=deadline)
    if timed is None:
        return None
    replayed = sum(n * timed[0][c] for c, n in calls.items())
    with fake_loss_module(config, 1, small, fake=False) as module, attention_as_run(small.document_mask):
        batch = fake_batch(small)
        walls = []
        for _ in range(7):
            start = time.perf_counter()
            with small.autocast():
                loss = module(**batch)
            loss.backward()
            module.zero_grad(set_to_none=True)
            walls.append(time.perf_counter() - start)
    wall = sorted(walls[2:])[len(walls[2:]) // 2]  # the median after two warm-ups
    return max(wall - replayed, 0.0) / sum(calls.values())


def replay_model(
    config: Any, step: StepShape, *, num_layers: int, threads: int, ranks: int = 1
) -> ReplayTime | None:
    """One micro-batch of `step` on the model of `config` (`num_layers` blocks) timed op by op with `threads`
    intra-op threads, in `ranks` processes at once where several ranks share this machine (they share its
    caches and memory bandwidth: alone, a rank's ops run faster than in the job), plus the framework's time
    per call; None when a call is too large to materialize here, or the timing takes too long."""
    one, two = record_step(config, 1, step), record_step(config, min(2, num_layers), step)
    distinct = canonical(set(one) | set(two))
    if any(call_bytes(c) > REPLAY_MAX_BYTES for c in distinct):
        return None
    deadline = time.perf_counter() + REPLAY_MAX_SECONDS
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with concurrent_ranks(config, step, num_layers, threads, ranks - 1) as others:
            timed = time_calls(distinct, deadline=deadline)
            their_costs = others()
        per_call = overhead_per_call(step, config, deadline=deadline)
    finally:
        torch.set_num_threads(previous)
    if timed is None or per_call is None or their_costs is None:
        return None
    cost, failed = timed
    for costs in their_costs:  # each call's mean over the ranks
        for call, seconds in zip(distinct, costs, strict=True):
            cost[call] += seconds
    cost = {call: seconds / (1 + len(their_costs)) for call, seconds in cost.items()}
    return cost_model(one, two, cost, failed, num_layers=num_layers, per_call=per_call, ranks=ranks)


def canonical(calls: set[OpCall]) -> list[OpCall]:
    """The calls in an order every process computes alike (the same calls, the same reprs)."""
    return sorted(calls, key=repr)


@contextlib.contextmanager
def concurrent_ranks(
    config: Any, step: StepShape, num_layers: int, threads: int, count: int
) -> Iterator[Callable[[], list[list[float]] | None]]:
    """`count` processes that each record the same calls and time them while this process does; yields a
    function that returns their costs (in canonical order), or None when one failed."""
    if count < 1:
        yield lambda: []
        return
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no fork of this one's threads
    ready, results = context.Barrier(count + 1), context.Queue()
    processes = [
        context.Process(
            target=_timing_worker, args=(config, step, num_layers, threads, ready, results), daemon=True
        )
        for _ in range(count)
    ]
    for process in processes:
        process.start()

    def costs() -> list[list[float]] | None:
        try:
            reported = [results.get(timeout=REPLAY_MAX_SECONDS) for _ in processes]
        except queue.Empty:
            return None
        return None if any(r is None for r in reported) else reported

    try:
        ready.wait(timeout=REPLAY_MAX_SECONDS)  # they have imported torch and recorded their calls
        yield costs
    except threading.BrokenBarrierError:
        yield lambda: None
    finally:
        for process in processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()


def _timing_worker(config: Any, step: StepShape, num_layers: int, threads: int, ready, results) -> None:
    torch.set_num_threads(threads)
    one, two = record_step(config, 1, step), record_step(config, min(2, num_layers), step)
    distinct = canonical(set(one) | set(two))
    ready.wait()
    timed = time_calls(set(distinct), deadline=time.perf_counter() + REPLAY_MAX_SECONDS)
    results.put([timed[0][c] for c in distinct] if timed else None)


def cost_model(
    one_block: Counter[OpCall],
    two_blocks: Counter[OpCall],
    cost: dict[OpCall, float],
    failed: set[OpCall],
    *,
    num_layers: int,
    per_call: float,
    ranks: int,
) -> ReplayTime:
    """The model of `num_layers` blocks: the first block's calls, and L - 1 times the second's."""

    def total(calls: Counter[OpCall], pick) -> float:
        return sum(n * pick(c) for c, n in calls.items())

    def per_model(pick) -> float:
        one = total(one_block, pick)
        return one + (num_layers - 1) * max(total(two_blocks, pick) - one, 0.0)

    calls = round(per_model(lambda c: 1))
    return ReplayTime(
        seconds=per_model(lambda c: cost[c]) + calls * per_call,
        calls=calls,
        failed=round(per_model(lambda c: c in failed)),
        overhead_per_call=per_call,
        ranks=ranks,
    )


def time_collectives(keys: set[tuple[str, float]], ranks: int) -> dict[tuple[str, float], float] | None:
    """Seconds of each collective call (kind, bytes of the whole tensor) among `ranks` processes of this
    machine on gloo, as a CPU job's ranks run it: the median of 5 after a warm-up. None when the processes
    do not report within REPLAY_MAX_SECONDS."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ordered = sorted(keys)
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    processes = [
        context.Process(target=_collective_worker, args=(rank, ranks, port, ordered, results), daemon=True)
        for rank in range(ranks)
    ]
    for process in processes:
        process.start()
    try:
        seconds = results.get(timeout=REPLAY_MAX_SECONDS)
    except queue.Empty:
        seconds = None
    for process in processes:
        process.join(timeout=5)
        if process.is_alive():
            process.kill()
    return None if seconds is None else dict(zip(ordered, seconds, strict=True))


def _collective_worker(rank: int, ranks: int, port: int, keys: list[tuple[str, float]], results) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=ranks)
    try:
        seconds = []
        for kind, size in keys:
            numel = max(round(size / 4 / ranks), 1) * ranks  # float32, split evenly over the ranks
            whole, shard = torch.ones(numel), torch.ones(numel // ranks)
            times = []
            for _ in range(6):  # a warm-up, then 5
                start = time.perf_counter()
                if kind == "all_reduce":
                    dist.all_reduce(whole)
                elif kind == "all_gather":
                    dist.all_gather_into_tensor(whole, shard)
                else:
                    dist.reduce_scatter_tensor(shard, whole)
                times.append(time.perf_counter() - start)
            seconds.append(sorted(times[1:])[2])
        if rank == 0:
            results.put(seconds)
    finally:
        dist.destroy_process_group()
