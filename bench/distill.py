"""Does distillation help? A teacher, then a smaller student trained with and without it, on the embedded data.

Every run is the real command (``python -m trainer.train`` in a subprocess) on the embedded Markov corpus,
whose entropy rate is the lowest eval loss any model can reach:

1. the teacher: the default tiny Llama (hidden 128, 4 layers) for ``--teacher-steps`` steps;
2. the student alone: a smaller Llama (``--student-hidden``, ``--student-layers``) for ``--steps`` steps on
   its own cross-entropy;
3. the student distilled: the same student, init, data order and steps, with ``distill=kd`` from the
   teacher's checkpoint, once per ``--alpha`` x ``--temperature`` pair.

It prints the eval loss of each (on the whole eval split), the teacher's, the entropy floor, and for each
distilled student the ratio of its gap to the floor over the undistilled student's gap (below 1: distillation
helped). The numbers also go to ``OUT/results.json``.

    .venv/bin/python bench/distill.py                      # ~10 minutes on 2 shared cores
    .venv/bin/python bench/distill.py --quick              # smoke check, tiny sizes, ~1 minute
    .venv/bin/python bench/distill.py --alpha 0.5 0.9 --temperature 1 2 --steps 200
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(name: str, overrides: list[str], out: Path, *, threads: int) -> dict:
    """One training run of the real command; returns its final evaluation record and wall time."""
    run_dir = out / name
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(threads))
    args = [
        *overrides,
        "train.progress_bar=false",
        "train.eval_every=0",
        "checkpoint.every_steps=0",
        "checkpoint.keep_last=1",
        "metrics.peak_flops=1e11",  # skip the CPU probe: MFU is not what this measures
        f"hydra.run.dir={run_dir}",
    ]
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.train", *args], cwd=ROOT, env=env, capture_output=True, text=True
    )
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in records if "eval_loss" in r][-1]
    train = [r for r in records if "loss" in r]
    print(f"  {name}: eval loss {final['eval_loss']:.4f} in {seconds:.0f}s", flush=True)
    return {"eval": final, "last_train": train[-1], "seconds": seconds, "overrides": overrides}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher-steps", type=int, default=300)
    p.add_argument("--steps", type=int, default=150, help="steps of each student run")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--student-hidden", type=int, default=48)
    p.add_argument("--student-layers", type=int, default=2)
    p.add_argument("--alpha", type=float, nargs="+", default=[0.9])
    p.add_argument("--temperature", type=float, nargs="+", default=[1.0])
    p.add_argument("--loss", default="forward_kl")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (1 on a shared machine)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the script, proves nothing")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "distill")
    p.add_argument("--reuse-teacher", action="store_true", help="keep a teacher already trained in OUT")
    args = p.parse_args()

    data = [f"data.seq_len={args.seq_len}"]
    if args.quick:
        args.teacher_steps, args.steps = 10, 5
        data += ["data.markov.train_tokens=50000", "data.markov.eval_tokens=5000"]
    student = [
        f"model.arch.hidden_size={args.student_hidden}",
        f"model.arch.intermediate_size={3 * args.student_hidden}",
        f"model.arch.num_hidden_layers={args.student_layers}",
        "model.arch.num_attention_heads=2",
        "model.arch.num_key_value_heads=2",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"teacher: default tiny Llama, {args.teacher_steps} steps", flush=True)
    teacher_dir = args.out / "teacher"
    if args.reuse_teacher and (teacher_dir / "checkpoints" / "latest").is_file():
        records = [json.loads(line) for line in (teacher_dir / "metrics.jsonl").read_text().splitlines()]
        teacher = {"eval": [r for r in records if "eval_loss" in r][-1], "reused": True}
    else:
        teacher = run(
            "teacher", [*data, f"train.max_steps={args.teacher_steps}"], args.out, threads=args.threads
        )
    print(
        f"students: hidden {args.student_hidden}, {args.student_layers} layers, {args.steps} steps",
        flush=True,
    )
    common = [*data, *student, f"train.max_steps={args.steps}"]
    alone = run("student_alone", common, args.out, threads=args.threads)
    distilled = {}
    for alpha in args.alpha:
        for temperature in args.temperature:
            name = f"student_kd_a{alpha:g}_t{temperature:g}"
            kd = [
                "distill=kd",
                f"distill.teacher={teacher_dir}",
                f"distill.loss={args.loss}",
                f"distill.alpha={alpha}",
                f"distill.temperature={temperature}",
            ]
            distilled[name] = run(name, [*common, *kd], args.out, threads=args.threads)

    floor = alone["eval"]["entropy_floor"]
    gap = alone["eval"]["eval_loss"] - floor
    print(f"\nentropy floor of the source: {floor:.4f}")
    print(f"teacher ({args.teacher_steps} steps):  eval loss {teacher['eval']['eval_loss']:.4f}")
    print(f"student alone ({args.steps} steps): eval loss {alone['eval']['eval_loss']:.4f} (gap {gap:.4f})")
    summary = {}
    for name, r in distilled.items():
        loss = r["eval"]["eval_loss"]
        ratio = (loss - floor) / gap if gap > 0 else float("nan")
        verdict = "lower" if loss < alone["eval"]["eval_loss"] else "NOT lower"
        print(
            f"{name} ({args.steps} steps): eval loss {loss:.4f} (gap {loss - floor:.4f}, {ratio:.2f}x the "
            f"undistilled gap: {verdict})"
        )
        summary[name] = {"eval_loss": loss, "gap_ratio": ratio}
    results = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "entropy_floor": floor,
        "teacher": teacher,
        "student_alone": alone,
        "student_distilled": distilled,
        "summary": summary,
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"details: {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
