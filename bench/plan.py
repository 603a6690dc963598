"""trainer.plan's predictions against measured and published runs: memory per GPU and tokens/s.

Each row is a configuration someone ran, with what they measured, planned with `python -m trainer.plan`'s own
functions from the same overrides (no GPU needed: the plan never allocates the model):

* our H200 runs (bench/RESULTS.md, "MFU at 1B parameters"): bench/mfu.py's overrides, one rank;
* torchtitan's published Llama 3.1 8B FSDP runs on 8 and 128 H100s (pytorch/torchtitan,
  benchmarks/llama3_h100_202412_torchtitan.md, Tables 1 and 3: local batch 2, sequences of 8,192, their
  op-level selective activation checkpointing, which also recomputes every second matmul: planned with our
  full, selective and no checkpointing).

The measured figures are this table's, copied from their sources; the predictions are computed on each run.

    .venv/bin/python bench/plan.py            # every row, ~4 minutes on 2 cores
    .venv/bin/python bench/plan.py --quick    # the first row: checks the script
    .venv/bin/python bench/plan.py --h200     # our H200 rows only
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from hydra import initialize_config_dir  # noqa: E402
from mfu import overrides as mfu_overrides  # noqa: E402 - bench/ is on the path of a script run from it
from mfu import parse_args as mfu_args  # noqa: E402
from mfu import parse_variant  # noqa: E402

from trainer.errors import ConfigError  # noqa: E402
from trainer.plan.__main__ import CONF_DIR, compose_plan  # noqa: E402
from trainer.plan.devices import GIB  # noqa: E402
from trainer.plan.planner import make_plan  # noqa: E402

# (variant of bench/mfu.py, measured tokens/s, measured peak GiB): bench/RESULTS.md, one H200, 2026-11-27.
H200_1B = [
    ("fsdp:bf16", 54164, 39.2),
    ("zero2:bf16", 53128, 42.8),
    ("zero3:bf16", 51905, 43.0),
    ("fsdp:bf16:compile", 60017, 37.0),
    ("fsdp:fp8:compile", 71706, 31.0),
]

LLAMA31_8B = [
    "+model.arch.vocab_size=128256",
    "model.arch.hidden_size=4096",
    "model.arch.intermediate_size=14336",
    "model.arch.num_hidden_layers=32",
    "model.arch.num_attention_heads=32",
    "model.arch.num_key_value_heads=8",
    "model.arch.max_position_embeddings=8192",
    "model.arch.rope_theta=500000.0",
    "model.arch.tie_word_embeddings=false",
    "data.seq_len=8192",
    "train.micro_batch_size=2",
    "strategy=fsdp",
    "precision=bf16",
]
# (label, nodes, compile, published tokens/s per GPU, published GiB): torchtitan's Tables 1 and 3 (H100 96 GB
# HBM2e at 500 W, 8 GPUs per node, 400 Gb/s RDMA per GPU).
TORCHTITAN = [
    ("8 GPUs, eager", 1, False, 5762, 82.4),
    ("8 GPUs, compiled", 1, True, 6667, 77.0),
    ("128 GPUs, eager", 16, False, 5605, 67.0),
    ("128 GPUs, compiled", 16, True, 6514, 62.0),
]
# torchtitan's earlier Llama 3 runs, FSDP on 64 A100 80GB (docs/performance.md at commit 0413364, "Llama 3
# performance numbers"): local batch 1, sequences of 8,192; the 8B with selective checkpointing (planned with
# ours, full and none), the 70B with full. The network is not stated there: planned as InfiniBand HDR (DGX A100's).
LLAMA3_70B = [
    "+model.arch.vocab_size=128256",
    "model.arch.hidden_size=8192",
    "model.arch.intermediate_size=28672",
    "model.arch.num_hidden_layers=80",
    "model.arch.num_attention_heads=64",
    "model.arch.num_key_value_heads=8",
    "model.arch.max_position_embeddings=8192",
    "model.arch.rope_theta=500000.0",
    "model.arch.tie_word_embeddings=false",
    "data.seq_len=8192",
    "train.micro_batch_size=1",
    "strategy=fsdp",
    "precision=bf16",
]
# (label, model overrides, activation checkpointing choices, published tokens/s per GPU)
TORCHTITAN_A100 = [
    (
        "Llama 3 8B, 64 A100, selective AC",
        [o for o in LLAMA31_8B if "micro_batch" not in o],
        ("true", "selective", "false"),
        2904,
    ),
    ("Llama 3 70B, 64 A100, full AC", LLAMA3_70B, ("true",), 331),
]
AC_NAMES = {"true": "full", "selective": "selective", "false": "no"}
# The H100s torchtitan measured have 96 GB (their memory figures are of those; nvidia-smi: 97,871 MiB).
TORCHTITAN_GIB = 95.6


def plan(overrides: list[str]) -> tuple[float, float, bool]:
    """(tokens/s per GPU, GiB per GPU, fits) that trainer.plan predicts; the memory is the most the tensors hold
    (torch.cuda.max_memory_allocated's measure), without the fragmentation margin."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg, p = compose_plan([*overrides, "plan.alternatives=false"])
    try:
        result = make_plan(cfg, p)
    except ConfigError:  # nothing fits these GPUs: a row all the same
        return float("nan"), float("nan"), False
    job = result.job
    return job.tokens_per_s / result.world_size, job.memory.allocated / GIB, job.fits


# The CPU check: the default model under 2 ranks (gloo), one thread each, measured here against its plan.
CPU_STEPS, CPU_WARMUP = 30, 5
CPU_RUN = [
    "train.max_steps=30",
    "train.log_every=1",
    "train.eval_every=0",
    "train.progress_bar=false",
    "train.export_hf=false",
    "checkpoint.every_steps=0",
    "checkpoint.at_end=false",
    "train.global_batch_size=32",
]


def _gloo_probe(rank: int, port: int, out: str) -> None:
    """One rank of the bandwidth probe: all-reduces of 32 MB, the bus bandwidth as nccl-tests defines it."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    x = torch.ones(8 * 2**20)
    dist.all_reduce(x)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        dist.all_reduce(x)
        best = min(best, time.perf_counter() - start)
    if rank == 0:
        Path(out).write_text(str(2 * x.numel() * 4 * (2 - 1) / 2 / best))
    dist.destroy_process_group()


def gloo_bandwidth(tmp: Path) -> float:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp / "gloo.txt"
    mp.spawn(_gloo_probe, args=(port, str(out)), nprocs=2)
    return float(out.read_text())


def measured_cpu_run(strategy: str, tmp: Path) -> float:
    """tokens/s of the default model under torchrun, 2 ranks of 1 thread (median after the warm-up steps)."""
    import json
    import os
    import statistics
    import subprocess

    run_dir = tmp / strategy
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "trainer.train"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    args = [f"strategy={strategy}", *CPU_RUN, f"hydra.run.dir={run_dir}"]
    subprocess.run([*cmd, *args], cwd=REPO, env=env, check=True, capture_output=True, timeout=900)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["tokens_per_s"] for r in records if "tokens_per_s" in r and r.get("step", 0) > CPU_WARMUP]
    return statistics.median(steps)


def cpu_rows(repeats: int = 3) -> None:
    """Each strategy measured `repeats` times and planned `repeats` times, alternately (this machine's speed
    drifts with what else runs on it); the medians compared."""
    import statistics
    import tempfile

    import torch

    from trainer.metrics import measure_cpu_peak_flops

    torch.set_num_threads(1)
    peak = measure_cpu_peak_flops()
    with tempfile.TemporaryDirectory() as d:
        bandwidth = gloo_bandwidth(Path(d))
        print(
            f"\nthis CPU: {peak / 1e9:.1f} GFLOP/s per thread (1024^3 fp32 matmul), gloo {bandwidth / 1e9:.2f} GB/s"
        )
        for strategy in ("ddp", "fsdp"):
            measured, predicted = [], []
            for _ in range(repeats):
                measured.append(measured_cpu_run(strategy, Path(d)) / 2)
                tps, _, _ = plan(
                    [
                        f"strategy={strategy}",
                        *CPU_RUN,
                        "plan.gpu=cpu",
                        "plan.gpus_per_node=2",
                        f"plan.peak_tflops={peak / 1e12}",  # for the MFU it prints only
                    ]
                )
                predicted.append(tps)
            m, p = statistics.median(measured), statistics.median(predicted)
            print(
                f"| CPU default model, 2 ranks, {strategy} | {m:,.0f} | {p:,.0f} | {off(p, m)} |"
                f" measured {', '.join(f'{x:,.0f}' for x in measured)}; planned {', '.join(f'{x:,.0f}' for x in predicted)}"
            )


def off(predicted: float, measured: float) -> str:
    return f"{100 * (predicted / measured - 1):+.1f}%"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the first H200 row only: checks the script")
    parser.add_argument("--cpu", action="store_true", help="only the CPU rows: real 2-rank runs here")
    parser.add_argument("--h200", action="store_true", help="only our H200 rows, not torchtitan's")
    a = parser.parse_args(argv)
    quick, ours_only = a.quick, a.quick or a.h200
    if a.cpu:
        cpu_rows()
        return
    start = time.perf_counter()
    a = mfu_args([])
    print("| run | measured tokens/s | predicted | off | measured GiB | predicted | off |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for variant, tokens, gib in H200_1B[:1] if quick else H200_1B:
        args = [
            o for o in mfu_overrides(parse_variant(variant), a, REPO / "unused") if not o.startswith("hydra.")
        ]
        tps, mem, _ = plan([*args, "plan.gpu=h200", "plan.gpus_per_node=1", "plan.nodes=1"])
        print(
            f"| H200 1B {variant} | {tokens:,} | {tps:,.0f} | {off(tps, tokens)} | {gib} | {mem:.1f} | {off(mem, gib)} |"
        )
    for label, nodes, compiled, tokens, gib in [] if ours_only else TORCHTITAN:
        for ac in ("true", "selective", "false"):
            args = [
                *LLAMA31_8B,
                f"train.global_batch_size={2 * 8 * nodes}",
                f"train.compile={str(compiled).lower()}",
                f"train.activation_checkpointing={ac}",
                "plan.gpu=h100",
                f"plan.memory_gib={TORCHTITAN_GIB}",
                "plan.gpus_per_node=8",
                f"plan.nodes={nodes}",
            ]
            tps, mem, fits = plan(args)
            if not fits:
                print(
                    f"| torchtitan 8B {label}, ours with {AC_NAMES[ac]} AC | {tokens:,} | does not fit | | {gib} | | |"
                )
                continue
            print(
                f"| torchtitan 8B {label}, ours with {AC_NAMES[ac]} AC | {tokens:,} | {tps:,.0f} "
                f"| {off(tps, tokens)} | {gib} | {mem:.1f} | {off(mem, gib)} |"
            )
    for label, model, choices, tokens in [] if ours_only else TORCHTITAN_A100:
        for ac in choices:
            args = [
                *model,
                "train.micro_batch_size=1",
                "train.global_batch_size=64",
                f"train.activation_checkpointing={ac}",
                "plan.gpu=a100_80gb",
                "plan.network=infiniband_hdr",
                "plan.gpus_per_node=8",
                "plan.nodes=8",
            ]
            tps, mem, fits = plan(args)
            what = f"ours with {AC_NAMES[ac]} AC"
            if not fits:
                print(f"| torchtitan {label}, {what} | {tokens:,} | does not fit | | | | |")
                continue
            print(
                f"| torchtitan {label}, {what} | {tokens:,} | {tps:,.0f} | {off(tps, tokens)} | | {mem:.1f} | |"
            )
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
