"""Speed and loss of each precision and optimizer, against fp32 + AdamW measured in the same run.

Every variant is the real command, `python -m trainer.train` with overrides, in its own process, on the same
model, data (pydoc, its BPE vocabulary), seed, batch and steps; this script reads back the variant's
`metrics.jsonl`: tokens/s (median of the logged windows after the first --warmup steps), MFU, peak memory
per rank and the final train and eval loss. Ratios are against the `fp32 adamw` variant of the same run.

Meant for a GPU (bf16 and fp8 matmuls, fused optimizers); on a CPU, bf16 matmuls are ~100x slower than
fp32 and fp8 or fused CUDA optimizers cannot run, so `--quick` shrinks everything to a smoke check. A variant
that cannot run on this machine is reported with the first line of its error, not hidden.

    python bench/precision.py                                   # GPU: 91M Llama, seq 1024
    python bench/precision.py --precisions fp32 bf16 fp8 --optimizers adamw adam_deepspeed adamw_apex
    python bench/precision.py --nproc 8 --strategy fsdp          # several GPUs, under torchrun
    python bench/precision.py --quick                            # CPU smoke check, tiny shapes
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "out" / "precision"


def model_overrides(a: argparse.Namespace) -> list[str]:
    heads = max(a.hidden // 64, 1)
    return [
        "data=pydoc",
        f"data.seq_len={a.seq_len}",
        f"model.arch.hidden_size={a.hidden}",
        f"model.arch.intermediate_size={a.intermediate}",
        f"model.arch.num_hidden_layers={a.layers}",
        f"model.arch.num_attention_heads={heads}",
        f"model.arch.num_key_value_heads={heads}",
        f"model.arch.max_position_embeddings={max(a.seq_len, 128)}",
        f"train.micro_batch_size={a.batch}",
        f"train.global_batch_size={a.batch * a.nproc}",
        f"train.max_steps={a.steps}",
        "train.log_every=1",
        "train.eval_every=0",
        "train.eval_batches=4",
        "train.progress_bar=false",
        "train.export_hf=false",
        "checkpoint.every_steps=0",
        "checkpoint.at_end=false",
        "scheduler=constant",
        "scheduler.warmup_steps=0",
        f"optimizer.lr={a.lr}",
        f"train.compile={str(a.compile).lower()}",
    ]


def run_variant(precision: str, optimizer: str, a: argparse.Namespace) -> dict[str, Any]:
    run_dir = OUT / f"{precision}-{optimizer}"
    overrides = [
        *model_overrides(a),
        f"precision={precision}",
        f"optimizer={optimizer}",
        f"strategy={a.strategy}",
        f"hydra.run.dir={run_dir}",
    ]
    if a.nproc > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        launcher = [
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(a.nproc),
            "--master_port",
            str(port),
        ]
    else:
        launcher = []
    cmd = [sys.executable, *launcher, "-m", "trainer.train", *overrides]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=a.timeout)
    row: dict[str, Any] = {
        "precision": precision,
        "optimizer": optimizer,
        "seconds": time.perf_counter() - start,
    }
    if proc.returncode != 0:
        row["error"] = error_line(proc.stderr + proc.stdout)
        return row
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r and r["step"] > a.warmup]
    evals = [r for r in records if "eval_loss" in r]
    row |= {
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps),
        "mfu": statistics.median(r["mfu"] for r in steps) if steps[-1]["mfu"] is not None else None,
        "peak_mem_gib": max(r["peak_mem_bytes"] for r in steps) / 2**30,
        "final_loss": steps[-1]["loss"],
        "eval_loss": evals[-1]["eval_loss"] if evals else None,
        "skipped_steps": steps[-1].get("skipped_steps"),
    }
    return row


def error_line(output: str) -> str:
    """Why a run failed, in one line: the trainer's own `error:` paragraph, else the last exception line
    (not Hydra's "Error executing job with overrides", which precedes every failure)."""
    lines = [line for line in output.strip().splitlines() if not line.startswith("Error executing job")]
    ours = [line for line in lines if line.startswith("error:")]
    errors = ours or [line for line in lines if "Error" in line]
    return (errors[-1] if errors else lines[-1] if lines else "failed")[:300]


def print_table(rows: list[dict[str, Any]]) -> None:
    base = next(
        (r for r in rows if r["precision"] == "fp32" and r["optimizer"] == "adamw" and "error" not in r), None
    )
    print(
        f"\n{'precision':9} {'optimizer':16} {'tokens/s':>10} {'vs fp32':>8} {'MFU':>6} {'peak GiB':>9} {'loss':>8} {'eval':>8}"
    )
    for r in rows:
        if "error" in r:
            print(f"{r['precision']:9} {r['optimizer']:16} cannot run here: {r['error']}")
            continue
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:7.2f}x" if base else f"{'':>8}"
        mfu = f"{100 * r['mfu']:5.1f}%" if r["mfu"] is not None else f"{'?':>6}"
        eval_loss = f"{r['eval_loss']:8.4f}" if r["eval_loss"] is not None else f"{'':>8}"
        print(
            f"{r['precision']:9} {r['optimizer']:16} {r['tokens_per_s']:10,.0f} {ratio} {mfu}"
            f" {r['peak_mem_gib']:9.2f} {r['final_loss']:8.4f} {eval_loss}"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "fp16", "fp8"])
    p.add_argument("--optimizers", nargs="+", default=["adamw"], help="conf/optimizer names")
    p.add_argument("--strategy", default="single")
    p.add_argument("--nproc", type=int, default=1, help="ranks (torchrun) for a distributed strategy")
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8, help="sequences per rank per step")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10, help="steps left out of the speed (compile, allocation)")
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--timeout", type=int, default=1800, help="seconds per variant")
    p.add_argument("--quick", action="store_true", help="tiny shapes: a CPU smoke check of the script")
    p.add_argument("--compile", action="store_true", help="torch.compile every variant (fp8's scaling fuses)")
    p.add_argument("--out", type=Path, default=OUT / "results.json", help="the results JSON")
    a = p.parse_args(argv)
    if a.quick:
        a.hidden, a.intermediate, a.layers, a.seq_len, a.batch, a.steps, a.warmup = 64, 128, 2, 64, 4, 12, 2
    return a


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    rows = []
    for optimizer in a.optimizers:
        for precision in a.precisions:
            rows.append(run_variant(precision, optimizer, a))
            print(json.dumps(rows[-1]), flush=True)
    print_table(rows)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"settings": {**vars(a), "out": str(a.out)}, "rows": rows}, indent=1))
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
