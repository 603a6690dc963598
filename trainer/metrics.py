"""Throughput, MFU, memory and the metrics.jsonl log."""

from __future__ import annotations

import json
import math
import resource
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from trainer.errors import TrainerWarning
from trainer.utils import write_atomic

# Dense bf16 tensor-core peaks (FLOP/s) of known GPUs, from the vendors' data sheets; the first key found in
# the device's name wins, so the specific variants come before their family.
GPU_PEAK_FLOPS = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H200": 989e12,
    "H100": 989e12,
    "H800": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "L4": 121e12,
}


def gpu_peak_flops(name: str) -> float | None:
    """A known GPU's dense bf16 peak from its device name; None for a GPU not in the table."""
    return next((value for key, value in GPU_PEAK_FLOPS.items() if key in name), None)


_cpu_peak_cache: float | None = None


def measure_cpu_peak_flops(size: int = 1024, repeats: int = 5) -> float:
    """Peak fp32 FLOP/s of this CPU as a square matmul reaches it (best of a few runs, after a warm-up)."""
    global _cpu_peak_cache
    if _cpu_peak_cache is None:
        a, b = torch.randn(size, size), torch.randn(size, size)
        a @ b
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
        _cpu_peak_cache = 2.0 * size**3 / best
    return _cpu_peak_cache


def peak_flops(device: torch.device, configured: float | None) -> float | None:
    """Per-device peak for MFU: the configured value, a known GPU's data sheet, or the CPU probe. An unknown
    GPU trains all the same, without MFU (None), and a warning says how to get it."""
    if configured:
        return float(configured)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak_flops(name)
        if peak is None:
            warnings.warn(
                f"GPU {name!r} is not in trainer.metrics.GPU_PEAK_FLOPS: MFU is not reported; set "
                "metrics.peak_flops to its dense bf16 peak FLOP/s (data sheet) to get it",
                TrainerWarning,
                stacklevel=2,
            )
        return peak
    return measure_cpu_peak_flops()


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this rank: allocated CUDA memory, or the process's peak resident set on CPU.

    On Linux VmHWM is this process's own peak; ru_maxrss would start from the parent's at fork time.
    """
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def mfu(tokens_per_s: float, flops_per_token: float, peak: float | None, num_devices: int) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak of all devices (None: peak unknown)."""
    if peak is None:
        return None
    return tokens_per_s * flops_per_token / (peak * num_devices)


# The key of a record that lists which of its values were not finite (written as null).
NONFINITE_KEY = "nonfinite"


def strict_record(record: dict[str, Any]) -> dict[str, Any]:
    """The record as strict JSON can hold it: a NaN or infinite number becomes null, and the keys it happened
    to are listed under NONFINITE_KEY (json.dumps would write a bare NaN, which strict parsers refuse)."""
    bad = [k for k, v in record.items() if _has_nonfinite(v)]
    if not bad:
        return record
    return {k: _finite_or_none(v) for k, v in record.items()} | {NONFINITE_KEY: bad}


def _has_nonfinite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return any(_has_nonfinite(v) for v in value)
    return False


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


class MetricsLog:
    """Appends one JSON object per record to metrics.jsonl (only where `enabled`, i.e. on rank 0).

    The file is opened at the first record: a run that fails before training leaves no metrics.jsonl. Every
    line is strict JSON (`strict_record`).
    """

    def __init__(self, path: Path, *, enabled: bool) -> None:
        self.path = path
        self.enabled = enabled
        self._file = None

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self._file is None:
            self._file = open(self.path, "a")  # noqa: SIM115 - held open for the run
        self._file.write(json.dumps(strict_record(record), allow_nan=False) + "\n")
        self._file.flush()

    def drop_after(self, step: int) -> None:
        """Remove the records of steps after `step`: a run resumed from step `step` logs them again, and the
        ones there came from the weights the checkpoint no longer has (the run went on past it, then stopped)."""
        if not self.enabled or not self.path.is_file():
            return
        lines = self.path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if _step_of(line) <= step]
        if len(kept) < len(lines):
            self.close()
            write_atomic(self.path, "".join(kept))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _step_of(line: str) -> float:
    """A metrics.jsonl line's step; a line cut short by a crash (no parseable step) counts as after any step."""
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf
