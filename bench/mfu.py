"""Tokens/s and MFU of a ~1B-parameter Llama on one GPU, per strategy, precision, compile and checkpointing.

Every variant is the real command, `python -m trainer.train` with overrides, in its own process, on the same
model (hidden 2048, 16 layers, MLP 8192, 32 query and 8 key/value heads, vocabulary 32,000: 1.04B parameters,
Llama 3.2 1B's shape with a 32k vocabulary), data (pydoc, packed into sequences of 2048), seed and steps. A
variant is STRATEGY:PRECISION[:compile][:ac|:sac][:rowwise][:profile] (ac: full activation checkpointing, sac:
selective; rowwise: fp8's rowwise scaling recipe; profile: torch.profiler over the last PROFILE_STEPS steps,
trainer.profiling). This script reads back the variant's `metrics.jsonl`:
tokens/s and MFU (median of the logged steps after --warmup, the profiled ones left out; MFU against the
device's dense bf16 data-sheet peak, trainer.metrics.GPU_PEAK_FLOPS), peak memory and the loss at the last
step, which compares precisions at equal steps on the same data, and, when profiled, how busy the device was
and that time by kind (matmul, attention, communication...). fp8 is set against bf16 with the same strategy
and switches. A variant that fails or runs out of time is reported with the first line of its error, and the
next one runs.

    python bench/mfu.py                                           # GPU: the default table
    python bench/mfu.py --variants fsdp:bf16 fsdp:fp8:compile:profile --steps 30
    python bench/mfu.py --quick                                   # CPU smoke check, tiny shapes, fp32
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from precision import error_line  # bench/ is on the path of a script run from it

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # the trainer/ of this checkout
from trainer.profiling import busy_line  # noqa: E402

OUT = REPO / "bench" / "out" / "mfu"
DEFAULT_VARIANTS = [
    "fsdp:bf16",
    "fsdp:fp8",
    "zero2:bf16",
    "zero3:bf16",
    "fsdp:bf16:compile",
    "fsdp:fp8:compile",
]
PROFILE_STEPS = 3  # the last steps of a :profile variant, left out of its speed
SWITCHES = {"compile", "ac", "sac", "rowwise", "profile"}


def parse_variant(text: str) -> dict[str, Any]:
    strategy, precision, *flags = text.split(":")
    unknown = set(flags) - SWITCHES
    if unknown:
        raise SystemExit(
            f"variant {text!r}: unknown switch {sorted(unknown)}; use {', '.join(sorted(SWITCHES))}"
        )
    return {"variant": text, "strategy": strategy, "precision": precision} | {s: s in flags for s in SWITCHES}


def profiled_steps(v: dict[str, Any], a: argparse.Namespace) -> range:
    return range(a.steps - PROFILE_STEPS + 1, a.steps + 1) if v["profile"] else range(0)


def overrides(v: dict[str, Any], a: argparse.Namespace, run_dir: Path) -> list[str]:
    return [
        "data=pydoc",
        f"data.seq_len={a.seq_len}",
        f"+model.arch.vocab_size={a.vocab}",
        f"model.arch.hidden_size={a.hidden}",
        f"model.arch.intermediate_size={a.intermediate}",
        f"model.arch.num_hidden_layers={a.layers}",
        f"model.arch.num_attention_heads={a.heads}",
        f"model.arch.num_key_value_heads={a.kv_heads}",
        f"model.arch.max_position_embeddings={a.seq_len}",
        "model.arch.rope_theta=500000.0",
        f"train.micro_batch_size={a.batch}",
        f"train.global_batch_size={a.batch}",
        f"train.max_steps={a.steps}",
        "train.log_every=1",
        "train.eval_every=0",
        "train.progress_bar=false",
        "train.export_hf=false",
        "checkpoint.every_steps=0",
        "checkpoint.at_end=false",
        "scheduler=constant",
        "scheduler.warmup_steps=0",
        f"optimizer.lr={a.lr}",
        f"strategy={v['strategy']}",
        f"precision={v['precision']}",
        f"train.compile={str(v['compile']).lower()}",
        f"train.activation_checkpointing={'selective' if v['sac'] else str(v['ac']).lower()}",
        f"precision.fp8_recipe={'rowwise' if v['rowwise'] else 'tensorwise'}",
        f"hydra.run.dir={run_dir}",
    ] + (
        [
            "profile.enabled=true",
            f"profile.start_step={profiled_steps(v, a).start}",
            f"profile.steps={PROFILE_STEPS}",
        ]
        if v["profile"]
        else []
    )


def run_variant(v: dict[str, Any], a: argparse.Namespace) -> dict[str, Any]:
    run_dir = OUT / v["variant"].replace(":", "-")
    cmd = [sys.executable, "-m", "trainer.train", *overrides(v, a, run_dir)]
    start = time.perf_counter()
    row = dict(v)
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=a.timeout)
    except subprocess.TimeoutExpired:
        return row | {"seconds": time.perf_counter() - start, "error": f"ran past --timeout {a.timeout}s"}
    row["seconds"] = time.perf_counter() - start
    (OUT / f"{run_dir.name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        row["error"] = error_line(proc.stdout + proc.stderr)
        return row
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r and "tokens_per_s" in r]
    timed = [r for r in steps if r["step"] > a.warmup and r["step"] not in profiled_steps(v, a)] or steps
    row |= {
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
        "mfu": statistics.median(r["mfu"] for r in timed) if timed[-1].get("mfu") is not None else None,
        "peak_mem_gib": max(r["peak_mem_bytes"] for r in steps) / 2**30,
        "final_loss": steps[-1]["loss"],
        "steps": steps[-1]["step"],
    }
    if v["profile"]:
        row["time_by_kind"] = json.loads((run_dir / "profile" / "rank0_summary.json").read_text())
        row["time_by_kind"]["ops"] = str(run_dir / "profile" / "rank0_ops.txt")
    return row


def _partner(r: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The bf16 row with the same strategy and switches as an fp8 row."""
    return next(
        (
            b
            for b in rows
            if b["precision"] == "bf16"
            and "error" not in b
            and all(b[k] == r[k] for k in ("strategy", "compile", "ac", "sac"))  # rowwise: fp8's own
        ),
        None,
    )


def print_table(rows: list[dict[str, Any]]) -> None:
    print(
        f"\n{'variant':22} {'tokens/s':>10} {'MFU':>6} {'peak GiB':>9} {'loss':>8} {'vs bf16':>8} {'wall s':>7}"
    )
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:22} did not run: {r['error']}")
            continue
        base = _partner(r, rows) if r["precision"] == "fp8" else None
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:7.2f}x" if base else f"{'':>8}"
        mfu = f"{100 * r['mfu']:5.1f}%" if r["mfu"] is not None else f"{'?':>6}"
        print(
            f"{r['variant']:22} {r['tokens_per_s']:10,.0f} {mfu} {r['peak_mem_gib']:9.2f} {r['final_loss']:8.4f}"
            f" {ratio} {r['seconds']:7.0f}"
        )
    profiled = [r for r in rows if "time_by_kind" in r]
    if profiled:
        print("\nwhere the time goes (the profiled steps; share of the device's busy time):")
    for r in profiled:
        print(f"{r['variant']:22} {busy_line(r['time_by_kind'])}; {r['time_by_kind']['ops']}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--variants",
        nargs="+",
        default=DEFAULT_VARIANTS,
        help="STRATEGY:PRECISION[:compile][:ac|:sac][:rowwise][:profile]",
    )
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=8192)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the speed (compile, allocation)")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--timeout", type=int, default=600, help="seconds per variant")
    p.add_argument(
        "--quick", action="store_true", help="tiny shapes in fp32: a CPU smoke check of the script"
    )
    p.add_argument("--out", type=Path, default=OUT / "results.json", help="the results JSON")
    a = p.parse_args(argv)
    if a.quick:
        a.hidden, a.intermediate, a.layers, a.heads, a.kv_heads = 64, 128, 2, 4, 2
        a.vocab, a.seq_len, a.batch, a.steps, a.warmup = 10240, 128, 2, 6, 2
    if any(parse_variant(v)["profile"] for v in a.variants) and a.steps < a.warmup + PROFILE_STEPS + 1:
        p.error(
            f"a :profile variant profiles its last {PROFILE_STEPS} steps, which leave the speed: --steps must be at "
            f"least --warmup + {PROFILE_STEPS + 1} ({a.warmup + PROFILE_STEPS + 1})"
        )
    return a


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for text in a.variants:
        rows.append(run_variant(parse_variant(text), a))
        print(json.dumps(rows[-1]), flush=True)
        # written after every variant: a run cut short still leaves what it measured
        a.out.write_text(json.dumps({"settings": {**vars(a), "out": str(a.out)}, "rows": rows}, indent=1))
    print_table(rows)
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
