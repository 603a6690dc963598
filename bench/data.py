"""Data at scale (issue 17): memory, read throughput, prepare throughput and data wait, each as a ratio in one run.

1. Peak RSS of a training run (the default tiny model, --steps steps, data=tokenized) on a synthetic prepared
   corpus of --big-tokens tokens against the same run on a --small-tokens corpus (target: at most +64 MiB).
2. Random-access read throughput of the memmap reader (random windows, in batches) in tokens/s against what
   training consumes in tokens/s (target: at least 100x).
3. `prepare_data` tokens/s against HF `datasets.map` with the same fast tokenizer and the same processes on the
   same text (pydoc topics repeated to --text-mb MB; target: at least 1.0x), and prepare's peak RSS at two
   input sizes (bounded: independent of the input size).
4. `data_wait_s` against the step time of the run of (1) (target: below 1%).

    python bench/data.py                      # 4e9-token corpus (8 GB of disk), 200 MB of text
    python bench/data.py --big-tokens 1e9 --text-mb 50 --num-proc 2
    python bench/data.py --quick              # smoke check: tiny corpora and text, proves nothing

Synthetic corpora are written in the prepared format (uniform random tokens, documents of 1,000 tokens). Each
measured run is its own process; peak RSS is its VmHWM. Results: bench/out/data.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHILD = """
import atexit, runpy, sys
def peak():
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM'):
            print('VMHWM_KB', int(line.split()[1]), flush=True)
atexit.register(peak)
module, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_module(module, run_name='__main__')
"""


def run_child(module: str, args: list[str]) -> tuple[int, str]:
    """Run `python -m module args` in a fresh process; its peak RSS in bytes and its output."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, module, *args], cwd=ROOT, env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise SystemExit(f"{module} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    kb = [int(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("VMHWM_KB")]
    return kb[-1] * 1024, proc.stdout


def synthesize(out: Path, num_tokens: int, tokenizer_dir: Path, *, shard_tokens: int = 1 << 28) -> Path:
    """A prepared dataset of uniform random tokens (documents of 1,000 tokens ending in EOS), 1% of it eval."""
    from trainer.data.prepared import META_FILE, TOKENIZER_DIR, make_meta, token_dtype, write_shard
    from trainer.data.tokenizer import load_tokenizer

    if (out / META_FILE).is_file():
        return out
    tok = load_tokenizer(str(tokenizer_dir))
    vocab, eos, dtype = len(tok), tok.eos_token_id, token_dtype(len(tok))
    tok.save_pretrained(str(out / TOKENIZER_DIR))
    rng = np.random.default_rng(0)
    shards_of = {}
    for split, tokens in (("train", num_tokens), ("eval", max(num_tokens // 100, 100_000))):
        (out / split).mkdir(parents=True, exist_ok=True)
        shards, left = [], tokens
        while left > 0:
            n = min(left, shard_tokens)
            stream = rng.integers(3, vocab, size=n, dtype=np.int64).astype(dtype)
            stream[999::1000] = eos
            stream[-1] = eos
            ends = list(range(1000, n, 1000)) + [n]
            docs = np.split(stream, ends[:-1])
            shards.append(write_shard(out / split, len(shards), docs, dtype))
            left -= n
        shards_of[split] = shards
    meta = make_meta(
        tokenizer=tok,
        tokenizer_name="bench",
        dtype=dtype,
        source={"synthetic": num_tokens},
        settings={},
        shards=shards_of,
        package_version="bench",
    )
    (out / META_FILE).write_text(json.dumps(meta, indent=2))
    return out


def pydoc_text(path: Path, megabytes: float) -> Path:
    """pydoc topics, one JSON line each, repeated up to `megabytes` MB."""
    from pydoc_data.topics import topics

    lines = [json.dumps({"text": topics[k]}) + "\n" for k in sorted(topics)]
    target, size = megabytes * 1e6, 0
    with open(path, "w") as f:
        while size < target:
            for line in lines:
                f.write(line)
                size += len(line)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--big-tokens", type=float, default=4e9)
    p.add_argument("--small-tokens", type=float, default=1e6)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--text-mb", type=float, default=200)
    p.add_argument("--num-proc", type=int, default=2)
    p.add_argument("--only", choices=["all", "prepare"], default="all", help="prepare: part 3 alone")
    p.add_argument("--work", default=None, help="where corpora are written (default: a temporary directory)")
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "data.json"))
    p.add_argument(
        "--quick", action="store_true", help="tiny corpora, 3 steps, 1 s of reads: checks the script"
    )
    a = p.parse_args()
    if a.quick:
        a.big_tokens, a.small_tokens, a.steps, a.text_mb, a.num_proc = 2e5, 1e5, 3, 0.4, 1
    work = Path(a.work or tempfile.mkdtemp(prefix="bench-data-"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"args": vars(a)}

    # A tokenizer: byte-level BPE (8,192) trained on pydoc, used by every part.
    from trainer.data.tokenizer import build_bpe_tokenizer

    tok_dir = work / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        from pydoc_data.topics import topics

        build_bpe_tokenizer([topics[k] for k in sorted(topics)], 8192).save_pretrained(str(tok_dir))

    # 1 and 4: peak RSS and data wait of training on a small and a big corpus.
    train = [
        "data=tokenized",
        "data.seq_len=128",
        f"train.max_steps={a.steps}",
        "train.log_every=1",
        "train.eval_every=0",
        "train.eval_batches=1",
        "train.progress_bar=false",
        "checkpoint.every_steps=0",
        "checkpoint.at_end=false",
        "train.export_hf=false",
    ]
    runs = {}
    for name, tokens in (("small", a.small_tokens), ("big", a.big_tokens)) if a.only == "all" else ():
        start = time.perf_counter()
        corpus = synthesize(work / f"corpus-{int(tokens)}", int(tokens), tok_dir)
        print(f"{name}: {int(tokens):,} tokens written in {time.perf_counter() - start:.0f}s", flush=True)
        run_dir = work / f"run-{name}"
        peak, _ = run_child("trainer.train", [*train, f"data.path={corpus}", f"hydra.run.dir={run_dir}"])
        records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in records if "loss" in r][1:]  # the first step's wait includes the first batch
        tokens_per_s = float(np.median([r["tokens_per_s"] for r in steps]))
        step_s = 16 * 128 / tokens_per_s
        wait = float(np.mean([r["data_wait_s"] for r in steps]))
        runs[name] = {
            "tokens": int(tokens),
            "peak_rss_mib": peak / 2**20,
            "tokens_per_s": tokens_per_s,
            "step_s": step_s,
            "data_wait_s": wait,
            "data_wait_fraction": wait / step_s,
        }
        print(
            f"  peak RSS {peak / 2**20:.0f} MiB, {tokens_per_s:,.0f} tokens/s, data_wait {wait * 1e3:.3f} ms "
            f"= {100 * wait / step_s:.3f}% of the step",
            flush=True,
        )
    results["train"] = runs
    if a.only == "all":
        train_and_read(a, work, runs, results)
    prepare_against_datasets(a, work, tok_dir, results)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=2))


def train_and_read(a, work: Path, runs: dict, results: dict) -> None:
    growth = runs["big"]["peak_rss_mib"] - runs["small"]["peak_rss_mib"]
    print(f"1. peak RSS growth: {growth:+.1f} MiB (target <= +64 MiB)", flush=True)

    # 2: random-access reads against training consumption.
    from trainer.data.prepared import PackedWindows, PreparedSplit, read_meta

    big = work / f"corpus-{int(a.big_tokens)}"
    windows = PackedWindows(PreparedSplit(big, "train", read_meta(big)), 128)
    rng = np.random.default_rng(1)
    import torch

    start, count = time.perf_counter(), 0
    while time.perf_counter() - start < (1 if a.quick else 5):
        windows.batch(torch.from_numpy(rng.integers(0, len(windows), size=16)))
        count += 16 * 128
    read = count / (time.perf_counter() - start)
    results["read_tokens_per_s"] = read
    ratio = read / runs["big"]["tokens_per_s"]
    print(f"2. random reads {read:,.0f} tokens/s = {ratio:,.0f}x training's consumption (target >= 100x)")
    print(f"4. data_wait_s {100 * runs['big']['data_wait_fraction']:.3f}% of the step time (target < 1%)")


def prepare_against_datasets(a, work: Path, tok_dir: Path, results: dict) -> None:
    """Part 3."""
    import shutil

    from trainer.data.prepared import read_meta

    # 3: prepare_data against datasets.map, same tokenizer and processes, same text; prepare's peak at 2 sizes.
    prep = {}
    # quick: the one size the datasets.map comparison reads (a second would only cost another process start)
    for mb in (a.text_mb,) if a.quick else (a.text_mb / 4, a.text_mb):
        text = pydoc_text(work / f"text-{mb:g}.jsonl", mb)
        out = work / f"prepared-{mb:g}"
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        peak, log = run_child(
            "trainer.prepare_data",
            [
                f"data_files={text}",
                f"tokenizer={tok_dir}",
                f"output_dir={out}",
                f"num_proc={a.num_proc}",
                "progress_bar=false",
                f"eval_fraction={0.1 if a.quick else 0.01}",  # quick: ~80 documents, at least one for eval
            ],
        )
        seconds = time.perf_counter() - start
        tokens = read_meta(out)["tokens"]
        prep[f"{mb:g}MB"] = {
            "tokens": tokens,
            "seconds": seconds,
            "tokens_per_s": tokens / seconds,
            "peak_rss_mib": peak / 2**20,
        }
        print(
            f"3. prepare_data {mb:g} MB: {tokens:,} tokens in {seconds:.1f}s ({tokens / seconds:,.0f}/s), "
            f"peak RSS {peak / 2**20:.0f} MiB",
            flush=True,
        )
    script = (
        "import sys, time, datasets; from transformers import AutoTokenizer\n"
        "tok = AutoTokenizer.from_pretrained(sys.argv[1]); t = time.perf_counter()\n"
        "ds = datasets.load_dataset('json', data_files=sys.argv[2], split='train', cache_dir=sys.argv[4])\n"
        "out = ds.map(lambda b: {'ids': tok(b['text'], add_special_tokens=False)['input_ids']}, batched=True,"
        " remove_columns=['text'], num_proc=int(sys.argv[3]))\n"
        "print('TOKENS', sum(len(x) for x in out['ids']) , time.perf_counter() - t)\n"
    )
    text = work / f"text-{a.text_mb:g}.jsonl"
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tok_dir), str(text), str(a.num_proc), str(work / "hf-cache")],
        capture_output=True,
        text=True,
        check=True,
    )
    seconds = time.perf_counter() - start
    [line] = [x for x in proc.stdout.splitlines() if x.startswith("TOKENS")]
    hf_tokens = int(line.split()[1])
    hf_rate = hf_tokens / seconds
    ours = prep[f"{a.text_mb:g}MB"]
    results["prepare"] = prep | {
        "datasets_map": {"tokens": hf_tokens, "seconds": seconds, "tokens_per_s": hf_rate}
    }
    print(
        f"3. prepare_data {ours['tokens_per_s']:,.0f} tokens/s vs datasets.map {hf_rate:,.0f} "
        f"({hf_tokens:,} tokens without EOS, process start and file load included in both): "
        f"{ours['tokens_per_s'] / hf_rate:.2f}x (target >= 1.0x)"
    )


if __name__ == "__main__":
    main()
