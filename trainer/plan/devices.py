"""The devices and networks trainer.plan knows, each figure with its source; every one can be overridden on
the command line (`plan.memory_gib`, `plan.peak_tflops`, `plan.intra_node_gbps`, `plan.inter_node_gbps`,
`plan.mfu`).

Bandwidths are per GPU, one direction, in bytes/s, as a ring collective sees them; the planner multiplies
them by COMM_EFFICIENCY, the share of the link rate NCCL's bus bandwidth reaches on large messages.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from trainer.errors import ConfigError

GIB = 2**30


@dataclass(frozen=True)
class Device:
    name: str
    memory_bytes: float  # what nvidia-smi reports as total (the fragmentation margin covers the CUDA context)
    peak_flops: float  # dense bf16 tensor-core FLOP/s (trainer.metrics.GPU_PEAK_FLOPS holds the same figures)
    fp8_flops: float | None  # dense fp8 FLOP/s; None where the GPU has no fp8 tensor cores
    hbm_bytes_per_s: float
    intra_node_bytes_per_s: float  # NVLink, per GPU and direction
    source: str


@dataclass(frozen=True)
class Network:
    name: str
    bytes_per_s: float  # per GPU and direction; a network shared by the node's GPUs is divided among them
    shared_by_node: bool
    source: str


DEVICES: dict[str, Device] = {
    "h100": Device(
        "NVIDIA H100 SXM5 80GB",
        memory_bytes=81559 * 2**20,
        peak_flops=989e12,
        fp8_flops=1979e12,
        hbm_bytes_per_s=3.35e12,
        intra_node_bytes_per_s=450e9,
        source="NVIDIA H100 Tensor Core GPU data sheet (SXM5: 989 TFLOPS bf16 dense, 1,979 fp8, 3.35 TB/s HBM3, "
        "NVLink 900 GB/s both directions); memory: nvidia-smi's 81,559 MiB",
    ),
    "h200": Device(
        "NVIDIA H200 SXM 141GB",
        memory_bytes=143771 * 2**20,
        peak_flops=989e12,
        fp8_flops=1979e12,
        hbm_bytes_per_s=4.8e12,
        intra_node_bytes_per_s=450e9,
        source="NVIDIA H200 Tensor Core GPU data sheet (SXM: 989 TFLOPS bf16 dense, 1,979 fp8, 4.8 TB/s HBM3e, "
        "NVLink 900 GB/s both directions); memory: nvidia-smi's 143,771 MiB on the device tool's nvidia-h200",
    ),
    "a100_80gb": Device(
        "NVIDIA A100 SXM4 80GB",
        memory_bytes=81920 * 2**20,
        peak_flops=312e12,
        fp8_flops=None,
        hbm_bytes_per_s=2.039e12,
        intra_node_bytes_per_s=300e9,
        source="NVIDIA A100 Tensor Core GPU data sheet (SXM4 80GB: 312 TFLOPS bf16 dense, 2,039 GB/s HBM2e, "
        "NVLink 600 GB/s both directions)",
    ),
    "a100_40gb": Device(
        "NVIDIA A100 SXM4 40GB",
        memory_bytes=40960 * 2**20,
        peak_flops=312e12,
        fp8_flops=None,
        hbm_bytes_per_s=1.555e12,
        intra_node_bytes_per_s=300e9,
        source="NVIDIA A100 Tensor Core GPU data sheet (SXM4 40GB: 312 TFLOPS bf16 dense, 1,555 GB/s HBM2, "
        "NVLink 600 GB/s both directions)",
    ),
}

NETWORKS: dict[str, Network] = {
    "infiniband_ndr": Network(
        "InfiniBand NDR, 400 Gb/s per GPU",
        bytes_per_s=50e9,
        shared_by_node=False,
        source="NVIDIA DGX H100 user guide: eight ConnectX-7 400 Gb/s NDR ports for the compute fabric, one per GPU",
    ),
    "infiniband_hdr": Network(
        "InfiniBand HDR, 200 Gb/s per GPU",
        bytes_per_s=25e9,
        shared_by_node=False,
        source="NVIDIA DGX A100 user guide: eight ConnectX-6 200 Gb/s HDR ports for the compute fabric, one per GPU",
    ),
    "ethernet_400g": Network(
        "Ethernet 400 GbE per node",
        bytes_per_s=50e9,
        shared_by_node=True,
        source="IEEE 802.3bs 400GBASE line rate, one port per node shared by its GPUs",
    ),
    "ethernet_100g": Network(
        "Ethernet 100 GbE per node",
        bytes_per_s=12.5e9,
        shared_by_node=True,
        source="IEEE 802.3ba 100GBASE line rate, one port per node shared by its GPUs",
    ),
}

# nccl-tests' all_reduce/all_gather bus bandwidth on large messages reaches about 80% of the link rate on
# NVLink and InfiniBand systems (NVIDIA's published DGX H100 figures: ~360-480 GB/s on 450 GB/s NVLink, ~40-45
# GB/s on 50 GB/s NDR): one figure for both, overridable through the bandwidths themselves.
COMM_EFFICIENCY = 0.8

# Our own measurements (bench/RESULTS.md, "MFU at 1B parameters": one H200, Llama 3.2 1B's shape, 8 x 2048
# tokens, fsdp): model FLOP/s over the bf16 data-sheet peak of a step without communication. The planner
# computes at these rates; fp8 at its own measured MFU (also against the bf16 peak). Eager fp8 was not
# measured: it takes the compiled gain over bf16 (51.0 / 42.7) applied to eager bf16, an assumption.
MEASURED_MFU = {
    ("bf16", False): 0.385,
    ("bf16", True): 0.427,
    ("fp8", True): 0.510,
    ("fp8", False): 0.385 * 0.510 / 0.427,
}
MFU_SOURCE = "bench/RESULTS.md, MFU at 1B parameters (one H200, fsdp, 8 x 2048 tokens, 2026-11-27)"


def check_names(plan: Any) -> None:
    """plan.gpu and plan.network name entries of the tables (before any other check: they are the plan's own)."""
    if str(plan.gpu) != "cpu":
        device(str(plan.gpu))
    network(str(plan.network))


def device(name: str) -> Device:
    """The device called `name`, or `cpu` (this machine: its matmul probe, its memory, a local loopback)."""
    if name == "cpu":
        return cpu_device()
    if name not in DEVICES:
        raise ConfigError(
            f"plan.gpu={name}: not a device trainer.plan knows; choose one of {', '.join([*DEVICES, 'cpu'])} "
            "(trainer/plan/devices.py), or give the nearest one with its figures overridden: plan.memory_gib, "
            "plan.peak_tflops, plan.intra_node_gbps"
        )
    return DEVICES[name]


def network(name: str) -> Network:
    if name not in NETWORKS:
        raise ConfigError(
            f"plan.network={name}: not a network trainer.plan knows; choose one of {', '.join(NETWORKS)} "
            "(trainer/plan/devices.py), or override its bandwidth with plan.inter_node_gbps"
        )
    return NETWORKS[name]


def cpu_device() -> Device:
    """This machine as a device: memory from /proc/meminfo, peak from trainer.metrics' matmul probe; the
    bandwidth between processes is a nominal 1 GB/s (override it with a measured gloo rate)."""
    from trainer.metrics import measure_cpu_peak_flops

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return Device(
        "this machine's CPU",
        memory_bytes=float(memory),
        peak_flops=measure_cpu_peak_flops(),
        fp8_flops=None,
        hbm_bytes_per_s=10e9,
        intra_node_bytes_per_s=1e9,
        source="trainer.metrics.measure_cpu_peak_flops (a 1024^3 fp32 matmul); memory: the machine's RAM",
    )
