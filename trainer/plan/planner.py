"""One job's plan: its memory and step time, the largest micro-batch that fits, and the alternatives (other
strategies, checkpointing, micro-batches) that fit the same GPUs, ranked by tokens/s.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from trainer.activation_checkpointing import MODES
from trainer.errors import ConfigError
from trainer.plan.activations import ActivationTrace
from trainer.plan.devices import GIB, Device, device, network
from trainer.plan.memory import (
    MemoryPlan,
    Setup,
    activations_for,
    compile_arrangement,
    plan_memory,
    setup_from_config,
    step_shape,
    trace_dtypes,
)
from trainer.plan.model import ModelCounts, apply_peft, count_model, model_config, teacher_params
from trainer.plan.replay import (
    REPLAY_MAX_SECONDS,
    ReplayTime,
    recomputed_bytes,
    replay_model,
    time_collectives,
)
from trainer.plan.steptime import Links, StepTime, collective_calls, links, plan_step
from trainer.strategies.layout import Layout, all_layouts, strategy_layout
from trainer.utils import resolve_dtype


@dataclass
class Option:
    """One way to run the job: its setup, memory and time."""

    setup: Setup
    memory: MemoryPlan
    time: StepTime
    fits: bool
    global_batch: int

    @property
    def tokens_per_s(self) -> float:
        return self.global_batch * self.setup.seq_len / self.time.step_s

    def label(self) -> str:
        s = self.setup
        return (
            f"strategy={s.layout.name} train.micro_batch_size={s.micro_batch} "
            f"train.activation_checkpointing={str(s.checkpointing).lower()}"
        )


@dataclass
class Plan:
    job: Option
    largest_micro_batch: int  # 0: not even one sequence fits
    micro_batches_tried: int  # plan.max_micro_batch: a larger one may fit too
    alternatives: list[Option]
    device: Device
    memory_bytes: float
    world_size: int
    counts: ModelCounts
    peak_flops: float
    # The activations of the same micro-batch with the other checkpointing choice (the "with and without").
    other_checkpointing: ActivationTrace | None = None


class Planner:
    """Plans setups of one training config on one cluster, tracing each activation shape once."""

    def __init__(self, cfg: Any, plan: Any) -> None:
        self.cfg, self.plan = cfg, plan
        self.dev = device(str(plan.gpu))
        self.on_cpu = str(plan.gpu) == "cpu"
        net = network(str(plan.network))
        self.world = int(plan.gpus_per_node) * int(plan.nodes)
        self.memory_bytes = plan.memory_gib * GIB if plan.memory_gib else self.dev.memory_bytes
        if plan.peak_tflops:
            self.dev = dataclasses.replace(self.dev, peak_flops=plan.peak_tflops * 1e12)
        self.links: Links = links(
            self.dev,
            net,
            nodes=int(plan.nodes),
            gpus_per_node=int(plan.gpus_per_node),
            intra=plan.intra_node_gbps * 1e9 if plan.intra_node_gbps else None,
            inter=plan.inter_node_gbps * 1e9 if plan.inter_node_gbps else None,
        )
        self._check_precision()
        param_bytes = resolve_dtype(cfg.train.dtype).itemsize
        self.counts = count_model(
            model_config(cfg, plan),
            seq_len=int(cfg.data.seq_len),
            trust_remote_code=cfg.model.trust_remote_code,
        )
        apply_peft(self.counts, cfg, param_bytes=param_bytes)
        self.teacher = teacher_params(cfg)
        self.masked = str(cfg.prune.name) != "none"
        self._traces: dict[tuple, ActivationTrace] = {}
        self._replays: dict[tuple, ReplayTime | None] = {}
        self._collectives: dict[tuple[str, float], float] = {}
        self._recomputed: dict[tuple, float] = {}

    def _check_precision(self) -> None:
        if str(self.cfg.precision.name) == "fp8" and not self.on_cpu and self.dev.fp8_flops is None:
            raise ConfigError(
                f"precision=fp8 on plan.gpu={self.plan.gpu}: {self.dev.name} has no fp8 tensor cores; use "
                "precision=bf16, or plan.gpu=h100 or h200"
            )

    def setup(self, layout: Layout, **changes: Any) -> Setup:
        s = setup_from_config(self.cfg, layout, world_size=self.world, foreach=self.on_cpu)
        s = dataclasses.replace(s, **changes)
        return dataclasses.replace(
            s, grad_accum=max(int(self.cfg.train.global_batch_size) // (s.micro_batch * self.world), 1)
        )

    def trace(self, s: Setup) -> ActivationTrace:
        key = (
            trace_dtypes(s),
            tuple(compile_arrangement(s).items()),
            s.checkpointing,
            s.micro_batch,
            s.seq_len,
            s.document_positions,
        )
        if key not in self._traces:
            self._traces[key] = activations_for(self.counts, s)
        return self._traces[key]

    def replay(self, s: Setup) -> ReplayTime | None:
        """One micro-batch of `s` timed op by op on this CPU, with the threads each rank gets (torchrun gives
        each of several ranks one); timed once per dtype and checkpointing choice at the job's micro-batch,
        other micro-batches in proportion."""
        key = (trace_dtypes(s), s.checkpointing, s.document_positions)
        # The replay runs each call of 1 and 2 blocks (and the root) 8 times: where that alone would take longer
        # than the replay may, the roofline answers at once.
        layers = self.counts.num_layers
        share = min(3 / (layers + 1), 1.0)
        tokens = int(self.cfg.train.micro_batch_size) * s.seq_len
        if 8 * self.counts.flops_per_token * tokens * share / self.dev.peak_flops > REPLAY_MAX_SECONDS:
            return None
        if key not in self._replays:
            ranks = int(self.plan.gpus_per_node)
            self._replays[key] = replay_model(
                self.counts.config,
                step_shape(s, micro_batch=int(self.cfg.train.micro_batch_size)),
                num_layers=layers,
                threads=1 if ranks > 1 else torch.get_num_threads(),
                ranks=ranks,
            )
        measured = self._replays[key]
        if measured is None:
            return None
        scale = s.micro_batch / int(self.cfg.train.micro_batch_size)
        return dataclasses.replace(measured, seconds=measured.seconds * scale)

    def recomputed(self, s: Setup) -> float:
        """Bytes that selective checkpointing's recomputed ops move in one micro-batch of `s` (0 otherwise);
        traced once per sequence and dtype."""
        if s.checkpointing != "selective":
            return 0.0
        key = (trace_dtypes(s), s.seq_len, s.document_positions)
        if key not in self._recomputed:
            self._recomputed[key] = recomputed_bytes(self.counts.config, step_shape(s, micro_batch=1))
        return self._recomputed[key] * s.micro_batch * self.counts.num_layers

    def per_sequence(self, s: Setup) -> ActivationTrace:
        """One sequence's share of the activations traced at `s`'s micro-batch."""
        t = self.trace(s)
        return dataclasses.replace(t, saved=t.saved / s.micro_batch, peak=t.peak / s.micro_batch)

    def collectives_here(self, s: Setup) -> Callable[[str, float], float] | None:
        """The seconds of each of `s`'s collective calls timed on gloo among the node's ranks on this machine
        (trainer/plan/replay.py), where the link bandwidth is not overridden; None: the ring formula."""
        if self.plan.intra_node_gbps or self.world != int(self.plan.gpus_per_node):
            return None
        keys = {(c.kind, size) for c in collective_calls(self.counts, s, self.links) for size in c.sizes}
        missing = keys - self._collectives.keys()
        if missing:
            timed = time_collectives(missing, self.world)
            if timed is None:
                return None
            self._collectives |= timed
        return lambda kind, size: self._collectives[(kind, size)]

    def option(self, s: Setup, *, trace: ActivationTrace | None = None) -> Option:
        memory = plan_memory(
            self.counts,
            s,
            fragmentation=float(self.plan.fragmentation),
            teacher=self.teacher,
            masked=self.masked,
            trace=trace or self.trace(s),
        )
        replayed = self.replay(s) if self.on_cpu and not self.plan.mfu else None
        time = plan_step(
            self.counts,
            s,
            self.dev,
            self.links,
            mfu=self.plan.mfu,
            on_cpu=self.on_cpu,
            replayed=replayed,
            measured=self.collectives_here(s) if self.on_cpu else None,
            recomputed_bytes=self.recomputed(s) if replayed is None else 0.0,
        )
        return Option(
            setup=s,
            memory=memory,
            time=time,
            fits=memory.peak <= self.memory_bytes,
            global_batch=int(self.cfg.train.global_batch_size),
        )

    def largest_micro_batch(self, s: Setup, *, dividing: bool = False) -> Option | None:
        """The largest micro-batch that fits (up to plan.max_micro_batch; with `dividing`, only those the
        global batch splits into over the ranks). Activations grow in proportion to the micro-batch: traced
        once at micro-batch 1, then scaled (a compiled step's trace, which compiles for seconds, is scaled
        down from the configured micro-batch's instead)."""
        one = self.trace(dataclasses.replace(s, micro_batch=1)) if not s.compile else self.per_sequence(s)
        best = None
        per_rank = max(int(self.cfg.train.global_batch_size) // self.world, 1)
        for mb in range(1, int(self.plan.max_micro_batch) + 1):
            if dividing and (mb > per_rank or per_rank % mb):
                continue
            scaled = ActivationTrace(
                saved=one.saved * mb,
                peak=one.peak * mb,
                grads_at_peak=one.grads_at_peak,
                grads_total=one.grads_total,
            )
            o = self.option(self.setup(s.layout, checkpointing=s.checkpointing, micro_batch=mb), trace=scaled)
            if not o.fits:
                break
            best = o
        return best

    def alternatives(self) -> list[Option]:
        """Every strategy and checkpointing choice that runs here, at the configured micro-batch and at the
        largest that fits; those that fit, fastest first."""
        out = []
        for layout in all_layouts():
            if not self.runs(layout):
                continue
            for ac in MODES:
                s = self.setup(layout, checkpointing=ac)
                for o in (self.option(s), self.largest_micro_batch(s, dividing=True)):
                    if (
                        o is not None
                        and o.fits
                        and o.setup.micro_batch
                        not in [x.setup.micro_batch for x in out if x.label() == o.label()]
                    ):
                        out.append(o)
        unique = {o.label(): o for o in out}
        return sorted(unique.values(), key=lambda o: -o.tokens_per_s)

    def runs(self, lay: Layout) -> bool:
        """Whether trainer.train would accept this strategy with the config (the checks strategies/ make)."""
        if lay.one_process and self.world > 1:
            return False
        if lay.deepspeed and str(self.cfg.precision.name) == "fp8":
            return False  # DeepSpeed does not shard torchao's float8 linears (strategies/zero.py)
        # zero3 refuses train.compile
        return not (lay.deepspeed and lay.shards_params and bool(self.cfg.train.compile))


def make_plan(cfg: Any, plan: Any) -> Plan:
    check_world(cfg, plan)
    p = Planner(cfg, plan)
    s = p.setup(strategy_layout(cfg.strategy), checkpointing=cfg.train.activation_checkpointing)
    job = p.option(s)
    largest = p.largest_micro_batch(s)
    # A job that does not fit always gets its alternatives: they say what would.
    alternatives = p.alternatives() if plan.alternatives or not job.fits else []
    result = Plan(
        job=job,
        largest_micro_batch=largest.setup.micro_batch if largest else 0,
        micro_batches_tried=int(plan.max_micro_batch),
        alternatives=alternatives,
        device=p.dev,
        memory_bytes=p.memory_bytes,
        world_size=p.world,
        counts=p.counts,
        peak_flops=p.dev.peak_flops,
        other_checkpointing=p.trace(dataclasses.replace(s, checkpointing=not s.checkpointing)),
    )
    if not job.fits and not alternatives:
        raise ConfigError(nothing_fits_message(p, job))
    return result


def check_world(cfg: Any, plan: Any) -> None:
    """The global batch must split evenly over the ranks' micro-batches, as trainer.train checks."""
    t = cfg.train
    world = int(plan.gpus_per_node) * int(plan.nodes)
    per_step = int(t.micro_batch_size) * world
    if int(t.global_batch_size) % per_step:
        divisors = [
            w for w in range(1, 4097) if int(t.global_batch_size) % (int(t.micro_batch_size) * w) == 0
        ]
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} does not divide over plan.gpus_per_node="
            f"{plan.gpus_per_node} x plan.nodes={plan.nodes} = {world} ranks of train.micro_batch_size="
            f"{t.micro_batch_size} ({per_step} sequences per micro-step); give a global batch that is a multiple "
            f"of {per_step}, e.g. train.global_batch_size={per_step * max(int(t.global_batch_size) // per_step, 1)}, "
            f"or a world size it divides: {', '.join(map(str, divisors[-6:]))}"
        )
    if strategy_layout(cfg.strategy).one_process and world > 1:
        raise ConfigError(
            f"strategy=single runs one process but plan.gpus_per_node x plan.nodes = {world}; plan a distributed "
            "strategy (strategy=fsdp, ddp, zero1, zero2 or zero3) or plan.gpus_per_node=1 plan.nodes=1"
        )


def nothing_fits_message(p: Planner, job: Option) -> str:
    """Why nothing fits these GPUs, and the smallest cluster (or the change) that would fit."""
    have = p.memory_bytes / GIB
    need = job.memory.peak / GIB
    base = (
        f"the job needs {need:.1f} GiB per GPU ({job.label()}) and no strategy, checkpointing or micro-batch "
        f"fits the {have:.1f} GiB of {p.dev.name} on {p.world} GPUs"
    )
    for nodes in (2**k for k in range(0, 13)):
        if nodes * int(p.plan.gpus_per_node) <= p.world:
            continue
        world = nodes * int(p.plan.gpus_per_node)
        for name in ("fsdp", "zero3"):
            s = p.setup(strategy_layout(name), checkpointing=True, micro_batch=1)
            s = dataclasses.replace(s, world_size=world)
            s = dataclasses.replace(s, grad_accum=max(int(p.cfg.train.global_batch_size) // world, 1))
            o = p.option(s)
            if o.fits:
                return (
                    f"{base}; it fits on plan.nodes={nodes} (x {p.plan.gpus_per_node} GPUs) with strategy={name} "
                    f"train.activation_checkpointing=true train.micro_batch_size=1 ({o.memory.peak / GIB:.1f} GiB "
                    "per GPU), or on GPUs with more memory (plan.gpu=h200)"
                )
    one = p.trace(p.setup(strategy_layout("fsdp"), checkpointing=True, micro_batch=1))
    return (
        f"{base}, nor on any number of them up to 4,096 nodes: one sequence of data.seq_len={p.cfg.data.seq_len} "
        f"alone holds {one.peak / GIB:.1f} GiB of activations with checkpointing; shorten data.seq_len, or use "
        "GPUs with more memory"
    )
