"""torch.profiler over a window of training steps: where a step's time goes.

With `profile.enabled=true` every rank records steps start_step .. start_step+steps-1 and writes, under the run
directory's profile/:
- rank{R}_trace.json: the Chrome trace (open it in ui.perfetto.dev or chrome://tracing);
- rank{R}_ops.txt: ops and kernels by self time on the device that computes (CUDA kernels on a GPU, CPU ops
  otherwise);
- rank{R}_summary.json: the window's wall time, how much of it the device was busy, and that busy time by kind
  (matmul, attention, communication, optimizer, compiled, other).

On a GPU, busy time is the sum of kernel times: kernels overlapping on several streams (communication beside
compute) count once each, so it can pass the wall time. A busy share well under 1 means the GPU waited on
the host (launch overhead, Python, data), which more FLOPs per kernel or torch.compile address.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import MISSING
from torch.autograd import DeviceType

from trainer.errors import ConfigError
from trainer.utils import write_atomic


@dataclass
class ProfileConfig:
    # Record a window of steps with torch.profiler; files under the run directory's profile/.
    enabled: bool = MISSING
    # The first step recorded (1-based); later than the first steps, whose compile and allocation are not typical.
    start_step: int = MISSING
    # How many steps are recorded.
    steps: int = MISSING


def validate_profile(p: Any, *, max_steps: int) -> None:
    for key in ("start_step", "steps"):
        value = getattr(p, key)
        if value < 1:
            raise ConfigError(f"profile.{key}={value}: must be >= 1, e.g. profile.{key}=3")
    last = p.start_step + p.steps - 1
    if p.enabled and max_steps > 0 and last > max_steps:
        raise ConfigError(
            f"profile.start_step={p.start_step} with profile.steps={p.steps} records up to step {last}, past "
            f"train.max_steps={max_steps}: lower profile.start_step or profile.steps, or raise train.max_steps"
        )


# The kind of an op or kernel, from its name: the first kind with a matching fragment (lowercase) wins, so that
# a communication or attention kernel is not taken for the matmul inside it.
KINDS = (
    ("communication", ("nccl", "gloo", "c10d", "all_gather", "allgather", "reduce_scatter", "all_reduce",
                       "allreduce", "alltoall")),  # not "broadcast": aten::broadcast_tensors is elementwise glue
    ("attention", ("flash", "attention", "fmha", "sdpa")),
    ("matmul", ("gemm", "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "_scaled_mm", "cutlass", "xmma",
                "nvjet", "cublas", "matmul")),
    ("optimizer", ("optimizer", "adam", "lion", "lamb", "multi_tensor", "_foreach")),
    ("compiled", ("triton", "compiledfunction", "torch-compiled")),
)  # fmt: skip


def kind_of(name: str) -> str:
    """The kind (KINDS, else `other`) of a profiled op or kernel named `name`."""
    lowered = name.lower()
    return next((kind for kind, parts in KINDS if any(p in lowered for p in parts)), "other")


def _kind_in_context(name: str, parent: Any) -> str:
    """The kind of `name`, else of its nearest enclosing op that has one: an elementwise kernel launched inside
    the optimizer's step is optimizer time, a copy inside FSDP's all-gather is communication."""
    kind = kind_of(name)
    while kind == "other" and parent is not None:
        kind, parent = kind_of(parent.name), parent.cpu_parent
    return kind


def busy_time_by_kind(events: Any, *, on_device: bool) -> dict[str, float]:
    """Seconds of busy time by kind (KINDS, then `other`) in torch.profiler's events: the GPU kernels' times when
    `on_device`, else the CPU ops' self times (which add up to the time the profiled threads spent in ops)."""
    totals: dict[str, float] = {kind: 0.0 for kind, _ in KINDS} | {"other": 0.0}
    # A kernel names the CPU op that launched it by that op's id (its linked correlation id).
    launchers = {
        e.id: e
        for e in events
        if e.device_type == DeviceType.CPU and not e.is_async and e.linked_correlation_id == 0
    }
    for e in events:
        if on_device and e.device_type != DeviceType.CPU:
            seconds, parent = e.time_range.elapsed_us() / 1e6, launchers.get(e.linked_correlation_id)
        elif not on_device and e.device_type == DeviceType.CPU and not e.is_async:
            seconds, parent = e.self_cpu_time_total / 1e6, e.cpu_parent
        else:
            continue
        totals[_kind_in_context(e.name, parent)] += seconds
    return totals


class StepProfiler:
    """Starts torch.profiler before the window's first step and writes its files after the last. The loop calls
    `before_step(n)` and `after_step(n)` around step n, and `close()` at the end (a run that stops inside the
    window stops the profiler and writes nothing). A run resumed past start_step records nothing."""

    def __init__(self, cfg: Any, *, out_dir: Path, rank: int, device: torch.device) -> None:
        self.enabled = bool(cfg.enabled)
        self.first, self.last = cfg.start_step, cfg.start_step + cfg.steps - 1
        self.out_dir, self.rank, self.device = out_dir, rank, device
        self._prof: torch.profiler.profile | None = None
        self._step_range: contextlib.AbstractContextManager | None = None
        self._start = 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def before_step(self, step: int) -> None:
        if not self.enabled:
            return
        if step == self.first and self._prof is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._sync()
            self._prof = torch.profiler.profile(activities=activities)
            self._prof.__enter__()
            self._start = time.perf_counter()
        if self._prof is not None:
            self._step_range = torch.profiler.record_function(f"train_step_{step}")
            self._step_range.__enter__()

    def after_step(self, step: int) -> dict[str, Any] | None:
        """After the window's last step: the files written, and their summary returned; else None."""
        if self._prof is None:
            return None
        self._step_range.__exit__(None, None, None)
        if step < self.last:
            return None
        self._sync()
        wall = time.perf_counter() - self._start
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        return self._write(prof, wall)

    def close(self) -> None:
        if self._prof is not None:
            prof, self._prof = self._prof, None
            prof.__exit__(None, None, None)

    def _write(self, prof: torch.profiler.profile, wall: float) -> dict[str, Any]:
        on_device = self.device.type == "cuda"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        stem = self.out_dir / f"rank{self.rank}"
        prof.export_chrome_trace(f"{stem}_trace.json")
        sort_by = "self_device_time_total" if on_device else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort_by, row_limit=40, max_name_column_width=80)
        write_atomic(Path(f"{stem}_ops.txt"), table + "\n")
        by_kind = busy_time_by_kind(prof.events(), on_device=on_device)
        busy = sum(by_kind.values())
        summary = {
            "steps": [self.first, self.last],
            "device": self.device.type,
            "wall_s": wall,
            "busy_s": busy,
            "busy_fraction": busy / wall if wall > 0 else None,
            "by_kind_s": by_kind,
            "by_kind_share": {k: v / busy if busy > 0 else 0.0 for k, v in by_kind.items()},
        }
        write_atomic(Path(f"{stem}_summary.json"), json.dumps(summary, indent=1) + "\n")
        return summary


def busy_line(summary: dict[str, Any]) -> str:
    """A summary's busy share of the wall time and its kinds, largest first: `busy 83% of 0.91 s; matmul 61%, ...`."""
    shares = sorted(summary["by_kind_share"].items(), key=lambda kv: -kv[1])
    kinds = ", ".join(f"{k} {100 * v:.0f}%" for k, v in shares if v >= 0.005)
    return f"busy {100 * summary['busy_fraction']:.0f}% of {summary['wall_s']:.2f} s; {kinds}"


def describe(summary: dict[str, Any], out_dir: Path) -> str:
    """One line for the console: the window, what was busy and how."""
    first, last = summary["steps"]
    what = "GPU kernels" if summary["device"] == "cuda" else "CPU ops"
    return f"profile of steps {first}-{last}: {out_dir} ({what} {busy_line(summary)})"
