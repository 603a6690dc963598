"""The plan as text: the job's memory and time tables, the verdict, and the alternatives that fit."""

from __future__ import annotations

from typing import Any

from trainer.plan.devices import GIB
from trainer.plan.planner import Option, Plan


def _gib(value: float) -> str:
    return f"{value / GIB:8.2f} GiB"


def memory_lines(o: Option) -> list[str]:
    m = o.memory
    lines = [
        f"  {name:28} {_gib(value)}"
        for name, value in m.parts.items()
        if value and name != "offloaded to CPU"
    ]
    acts = m.activations
    if acts is not None:
        lines.append(f"    (saved by the forward: {acts.saved / GIB:.2f} GiB; traced on fake tensors)")
    lines += [
        f"  {'peak in the backward':28} {_gib(m.backward_peak)}",
        f"  {'peak in the optimizer step':28} {_gib(m.step_peak)}",
        f"  {'fragmentation margin':28} {_gib(max(m.backward_peak, m.step_peak) * m.fragmentation)}"
        f"  ({m.fragmentation:.0%})",
        f"  {'peak per GPU':28} {_gib(m.peak)}",
    ]
    if m.host_bytes:
        lines.append(f"  {'in CPU memory (offload)':28} {_gib(m.host_bytes)}")
    return lines


def time_lines(o: Option, p: Plan) -> list[str]:
    t = o.time
    flops = p.counts.flops_per_token * o.tokens_per_s
    mfu = flops / (p.peak_flops * p.world_size)
    how = f"at {t.mfu_used:.1%} of {p.peak_flops / 1e12:,.3g} TFLOP/s"
    if t.recompute_s:
        how += f", and {t.recompute_s * 1e3:.1f} ms of selectively recomputed ops at the memory bandwidth"
    if t.replayed is not None:
        r = t.replayed
        how = f"{r.calls:,} operator calls per micro-batch timed on this CPU, {how}" + (
            f"; {r.failed:,} would not run and count as free" if r.failed else ""
        )
    lines = [f"  compute          {t.compute_s * 1e3:10.1f} ms  ({how})"]
    for name, volume in t.volumes.items():
        lines.append(f"    {name:30} {volume / GIB:8.2f} GiB per rank per step")
    lines += [
        f"  communication    {t.comm_s * 1e3:10.1f} ms  ({t.exposed_comm_s * 1e3:.1f} ms not hidden by the compute"
        + ("; each call timed on gloo here)" if t.comm_timed_here else ")"),
        f"  optimizer step   {t.optimizer_s * 1e3:10.1f} ms",
        f"  step             {t.step_s * 1e3:10.1f} ms",
        f"  tokens/s         {o.tokens_per_s:12,.0f}  ({o.tokens_per_s / p.world_size:,.0f} per GPU), MFU {mfu:.1%}",
    ]
    return lines


def format_plan(p: Plan, cfg: Any) -> str:
    job, c = p.job, p.counts
    head = (
        f"plan: {c.num_params / 1e9:.3f}B parameters ({c.trainable / 1e9:.3f}B trained), {c.num_layers} blocks, "
        f"{c.flops_per_token / 1e9:.2f} GFLOP/token; {p.world_size} x {p.device.name} "
        f"({p.memory_bytes / GIB:.1f} GiB each); {job.label()}, precision={cfg.precision.name}, "
        f"train.compile={str(bool(cfg.train.compile)).lower()}, "
        f"{job.setup.grad_accum} micro-batch(es) of {job.setup.micro_batch} x {job.setup.seq_len} tokens per step"
    )
    lines = [head, "", "memory per GPU (every rank holds the same):", *memory_lines(job)]
    if p.other_checkpointing is not None:
        other = "with" if not job.setup.checkpointing else "without"
        lines.append(
            f"    ({other} activation checkpointing the activations at the peak would be "
            f"{p.other_checkpointing.peak / GIB:.2f} GiB)"
        )
    verdict = "fits" if job.fits else "DOES NOT FIT"
    lines += [
        "",
        f"verdict: {verdict} ({job.memory.peak / GIB:.1f} of {p.memory_bytes / GIB:.1f} GiB); the largest "
        + (
            f"micro-batch that fits is train.micro_batch_size={p.largest_micro_batch}"
            + (
                f" (the largest tried: raise plan.max_micro_batch={p.micro_batches_tried} to look further)"
                if p.largest_micro_batch >= p.micro_batches_tried
                else ""
            )
            + " (with a global batch that is a multiple of it times the ranks)"
            if p.largest_micro_batch
            else "micro-batch: none fits (not even 1)"
        ),
        "",
        "step time (roofline):",
        *time_lines(job, p),
    ]
    if p.alternatives:
        lines += ["", "alternatives that fit, fastest first:"]
        lines.append(f"  {'tokens/s/GPU':>12} {'peak GiB':>9} {'step ms':>9}  overrides")
        for o in p.alternatives:
            lines.append(
                f"  {o.tokens_per_s / p.world_size:12,.0f} {o.memory.peak / GIB:9.1f} {o.time.step_s * 1e3:9.1f}  {o.label()}"
            )
    return "\n".join(lines)
