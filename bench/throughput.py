"""Training throughput and peak memory: this project's trainer vs a plain PyTorch loop vs the HF Trainer.

One run trains the same small Llama (random init, tied embeddings, a realistic 32k vocabulary so that the
LM head and the loss weigh) in fp32 on CPU three ways, on the same token windows in the same order:

1. ``trainer``: this project's ``trainer.loop.Trainer``, built from the Hydra-composed ``conf/`` with
   overrides and run with its own ``train()``; ``--loss-chunk-size`` and ``--compile`` take several values
   to sweep its settings (one run per combination).
2. ``plain``: a plain PyTorch loop: ``LlamaForCausalLM(input_ids=x, labels=y, shift_labels=y).loss``,
   backward, ``clip_grad_norm_``, ``torch.optim.AdamW`` step.
3. ``hf``: ``transformers.Trainer`` (CPU, no saving, no eval, no reporting, sequential sampler).

All three get the same model config and initial weights (same seed), micro-batch, sequence length, number of
steps, AdamW settings (lr, betas, eps, weight decay, grad clip 1.0) and constant learning rate. The data are
the pydoc windows the trainer builds (``trainer.data.build_data``), tokenized with a byte-level BPE of
``--vocab`` tokens trained once on pydoc plus the Python standard library (cached under ``bench/out``),
taken in the trainer's own sample order; the step-1 losses must agree, which checks that every variant
predicts the same targets from the same weights.

What is measured, the same way in every variant: wall time from the end of optimizer step ``--warmup`` to the
end of the last step (so the first steps, with one-off allocations and compilation, are not timed), including
everything the loop does between steps (batching, logging); tokens/s = timed steps x batch x seq_len / that
time. Each variant runs in its own subprocess, so peak memory is that process's peak resident set (imports,
data, model, optimizer and activations; VmHWM, as a child's ru_maxrss also counts its parent's memory at
fork time; both are in the JSON) and the variants cannot disturb each other.
MFU = tokens/s x ``trainer.models.flops_per_token`` / the CPU's peak, measured once per run with
``trainer.metrics.measure_cpu_peak_flops``. With ``--repeats N`` the variants run N times, interleaved, and
the median tokens/s (and the largest peak memory) is reported, which damps noise from other load.

Targets checked for each trainer setting: tokens/s >= 1.0x the plain loop and >= 1.3x the HF Trainer, with a
lower peak memory than both.

    .venv/bin/python bench/throughput.py --quick                  # smoke check (1 thread), < 1 minute
    .venv/bin/python bench/throughput.py                          # the realistic run (a few minutes on 2 cores)
    .venv/bin/python bench/throughput.py --threads 1 --repeats 2 --loss-chunk-size 512 2048
    .venv/bin/python bench/throughput.py --only trainer --loss-chunk-size 0 512 2048 --compile false true
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # benchmark the trainer/ of this checkout

import torch  # noqa: E402 - after the path set-up

DEFAULT_OUT = REPO / "bench" / "out" / "throughput.json"
TARGET_VS_PLAIN = 1.0
TARGET_VS_HF = 1.3

# Sizes of the realistic run and of --quick (1 thread: steady on a shared machine); explicit flags override either.
REALISTIC = dict(steps=15, warmup=3, batch=8, seq_len=256, vocab=32000, hidden=192, layers=4)
QUICK = dict(steps=6, warmup=2, batch=2, seq_len=64, vocab=8192, hidden=64, layers=2, threads=1)


# ---- what a worker is told and what it reports ------------------------------------------------------------


@dataclass
class Spec:
    """Everything one variant's subprocess needs; written as JSON next to the windows it trains on."""

    kind: str  # trainer, plain or hf
    label: str
    steps: int
    warmup: int
    batch: int
    seq_len: int
    seed: int
    lr: float
    weight_decay: float
    betas: tuple[float, float]
    eps: float
    grad_clip: float
    model_config: dict[str, Any]  # the transformers config the trainer builds, as a dict
    windows: str  # .pt file with the inputs/labels of every step, in the trainer's order
    work_dir: str  # this variant's scratch directory
    overrides: list[str] = field(default_factory=list)  # Hydra overrides (trainer only)
    threads: int | None = None  # torch intra-op threads (None: torch's default)
    profile: bool = False


@dataclass
class Result:
    label: str
    kind: str
    tokens_per_s: float
    timed_seconds: float
    timed_tokens: int
    peak_rss_mib: float  # peak resident set of the worker process (VmHWM)
    ru_maxrss_mib: float  # getrusage's figure, which includes the parent's memory at fork time
    setup_rss_mib: float  # resident set when the first step starts (imports, data, model, optimizer)
    losses: list[float]
    step_seconds: list[float]  # steps 2..N (end-to-end), warm-up included
    reported_tokens_per_s: float | None = None  # the trainer's own figure from metrics.jsonl (trainer only)


# ---- helpers shared by the workers --------------------------------------------------------------------------


def ru_maxrss_mib() -> float:
    """getrusage's peak resident set (KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def peak_rss_mib() -> float:
    """Peak resident set of this process image: VmHWM on Linux, else ru_maxrss.

    A child's ru_maxrss starts from its parent's high-water mark (Linux keeps it across fork and exec), so it
    would report the benchmark driver's memory for any variant smaller than it; VmHWM is the same peak
    counted for this executable alone.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return ru_maxrss_mib()


def current_rss_mib() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


class StepClock:
    """Marks the end of every optimizer step; times steps warmup+1..N and profiles them when asked."""

    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        self.marks: list[float] = []
        self.setup_rss_mib = current_rss_mib()
        self._profiler: torch.profiler.profile | None = None

    def step_end(self) -> None:
        self.marks.append(time.perf_counter())
        done = len(self.marks)
        if self.spec.profile and done == self.spec.warmup:
            self._profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self._profiler.__enter__()
        if self._profiler is not None and done == self.spec.steps:
            self._profiler.__exit__(None, None, None)
            table = self._profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
            path = Path(self.spec.work_dir) / "profile.txt"
            path.write_text(table)
            print(f"profile of the timed steps: {path}", flush=True)
            self._profiler = None

    def result(self, losses: list[float], **extra: Any) -> Result:
        s = self.spec
        if len(self.marks) != s.steps:
            raise RuntimeError(f"{s.label}: saw {len(self.marks)} optimizer steps, expected {s.steps}")
        seconds = self.marks[-1] - self.marks[s.warmup - 1]
        tokens = (s.steps - s.warmup) * s.batch * s.seq_len
        return Result(
            label=s.label,
            kind=s.kind,
            tokens_per_s=tokens / seconds,
            timed_seconds=seconds,
            timed_tokens=tokens,
            peak_rss_mib=peak_rss_mib(),
            ru_maxrss_mib=ru_maxrss_mib(),
            setup_rss_mib=self.setup_rss_mib,
            losses=losses,
            step_seconds=[b - a for a, b in zip(self.marks[:-1], self.marks[1:], strict=True)],
            **extra,
        )


def load_windows(spec: Spec) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.load(spec.windows)
    return w["inputs"], w["labels"]


def build_hf_model(spec: Spec) -> torch.nn.Module:
    """The trainer's model, built the way it builds it: same config, same seed, so the same initial weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(spec.model_config)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.config.use_cache = False
    return model


# ---- the three variants (each runs in its own subprocess) -------------------------------------------------


def run_trainer(spec: Spec) -> Result:
    """This project's Trainer from the composed Hydra config; its real train() loop, each step timed."""
    from hydra import compose, initialize_config_dir

    from trainer.config import register_configs
    from trainer.distributed import read_env
    from trainer.loop import Trainer

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=spec.overrides)
    run_dir = Path(spec.work_dir) / "run"
    shutil.rmtree(run_dir, ignore_errors=True)  # metrics.jsonl appends
    trainer = Trainer(cfg, run_dir=run_dir, env=read_env())

    losses: list[float] = []
    train_step = trainer.train_step
    clock = StepClock(spec)

    def timed_step() -> dict[str, float]:
        stats = train_step()
        clock.step_end()
        losses.append(stats["loss"])
        return stats

    trainer.train_step = timed_step  # type: ignore[method-assign]
    trainer.train()
    return clock.result(losses, reported_tokens_per_s=reported_tokens_per_s(run_dir / "metrics.jsonl", spec))


def reported_tokens_per_s(metrics_path: Path, spec: Spec) -> float | None:
    """tokens/s over the timed steps from the trainer's own per-step metrics.jsonl records (log_every=1)."""
    records = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    timed = [r for r in records if "tokens_per_s" in r and r["step"] > spec.warmup]
    if len(timed) != spec.steps - spec.warmup:
        return None
    tokens = spec.batch * spec.seq_len
    return len(timed) * tokens / sum(tokens / r["tokens_per_s"] for r in timed)


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on the matrices, none on biases, norms and the (tied) embedding."""
    decay, exempt = [], []
    for name, p in model.named_parameters():  # shared (tied) parameters are listed once
        (exempt if p.ndim < 2 or any(k in name for k in ("bias", "norm", "embed")) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": exempt, "weight_decay": 0.0}]


def run_plain(spec: Spec) -> Result:
    """A plain PyTorch loop over the same windows: forward with the HF loss, backward, clip, AdamW."""
    inputs, labels = load_windows(spec)
    model = build_hf_model(spec)
    optimizer = torch.optim.AdamW(
        decay_groups(model, spec.weight_decay), lr=spec.lr, betas=spec.betas, eps=spec.eps
    )
    model.train()
    clock = StepClock(spec)
    losses = []
    for step in range(spec.steps):
        rows = slice(step * spec.batch, (step + 1) * spec.batch)
        x, y = inputs[rows], labels[rows]
        # y is already the next token of every position: shift_labels stops HF from shifting it once more.
        loss = model(input_ids=x, labels=y, shift_labels=y).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        clock.step_end()
    return clock.result(losses)


def run_hf_trainer(spec: Spec) -> Result:
    """transformers.Trainer on the same windows, taken in order (sequential sampler), constant lr."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    inputs, labels = load_windows(spec)

    class Windows(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return inputs.shape[0]

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            # labels are already shifted: shift_labels tells the HF loss (and its token count) so.
            return {"input_ids": inputs[i], "labels": labels[i], "shift_labels": labels[i]}

    clock = StepClock(spec)

    class Clock(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            clock.step_end()

    args = TrainingArguments(
        output_dir=str(Path(spec.work_dir) / "hf_trainer"),
        per_device_train_batch_size=spec.batch,
        gradient_accumulation_steps=1,
        max_steps=spec.steps,
        learning_rate=spec.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        optim="adamw_torch",
        weight_decay=spec.weight_decay,
        adam_beta1=spec.betas[0],
        adam_beta2=spec.betas[1],
        adam_epsilon=spec.eps,
        max_grad_norm=spec.grad_clip,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        remove_unused_columns=False,  # keep shift_labels
        train_sampling_strategy="sequential",
        disable_tqdm=True,
        seed=spec.seed,
    )
    hf = Trainer(model=build_hf_model(spec), args=args, train_dataset=Windows(), callbacks=[Clock()])
    hf.train()
    losses = [h["loss"] for h in hf.state.log_history if "loss" in h]
    return clock.result(losses)


WORKERS: dict[str, Callable[[Spec], Result]] = {
    "trainer": run_trainer,
    "plain": run_plain,
    "hf": run_hf_trainer,
}


def worker_main(spec_path: Path, result_path: Path) -> None:
    raw = json.loads(spec_path.read_text())
    raw["betas"] = tuple(raw["betas"])
    spec = Spec(**raw)
    if spec.threads:
        torch.set_num_threads(spec.threads)
    result = WORKERS[spec.kind](spec)
    result_path.write_text(json.dumps(asdict(result), indent=1))


# ---- set-up in the parent: tokenizer, config, data, FLOPs --------------------------------------------------


def tokenizer_corpus(num_chars: int) -> list[str]:
    """pydoc's topic pages, then the standard library's sources (sorted), up to about num_chars characters."""
    import sysconfig
    from pydoc_data.topics import topics

    texts = [topics[k] for k in sorted(topics)]
    total = sum(map(len, texts))
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        if total >= num_chars:
            break
        if "site-packages" in path.parts:
            continue
        text = path.read_text(errors="ignore")
        texts.append(text)
        total += len(text)
    return texts


def build_tokenizer(vocab: int, directory: Path) -> Path:
    """A byte-level BPE of exactly `vocab` tokens (pydoc alone saturates near 9k), built once and cached."""
    if (directory / "tokenizer.json").exists():
        return directory
    from trainer.data.tokenizer import build_bpe_tokenizer

    print(
        f"training a {vocab}-token BPE on pydoc + the standard library (cached in {directory}) ...",
        flush=True,
    )
    tok = build_bpe_tokenizer(tokenizer_corpus(400 * vocab), vocab)
    if len(tok) < vocab:
        raise SystemExit(
            f"the corpus only supports {len(tok)} BPE tokens; ask for --vocab {len(tok)} or less"
        )
    tok.save_pretrained(str(directory))
    return directory


def trainer_overrides(a: argparse.Namespace, tokenizer_dir: Path, data_dir: Path, peak: float) -> list[str]:
    """Hydra overrides shared by every trainer setting (loss chunk size and compile are added per run)."""
    heads = a.heads or max(1, a.hidden // 64)
    return [
        "data=pydoc",
        f"data.tokenizer={tokenizer_dir}",
        f"data.cache_dir={data_dir}",
        f"data.seq_len={a.seq_len}",
        f"model.arch.hidden_size={a.hidden}",
        f"model.arch.intermediate_size={a.intermediate or 3 * a.hidden}",
        f"model.arch.num_hidden_layers={a.layers}",
        f"model.arch.num_attention_heads={heads}",
        f"model.arch.num_key_value_heads={heads}",
        f"model.arch.max_position_embeddings={max(1024, a.seq_len)}",
        "model.arch.tie_word_embeddings=true",
        "scheduler=constant",
        f"train.max_steps={a.steps}",
        f"train.micro_batch_size={a.batch}",
        f"train.global_batch_size={a.batch}",
        "train.dtype=float32",
        "train.device=cpu",
        "train.log_every=1",
        "train.eval_every=0",
        "train.eval_batches=1",
        "train.progress_bar=false",
        "train.export_hf=false",
        "checkpoint.every_steps=0",
        "checkpoint.at_end=false",
        f"metrics.peak_flops={peak}",
    ]


def compose_config(overrides: list[str]) -> Any:
    from hydra import compose, initialize_config_dir

    from trainer.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return compose(config_name="config", overrides=overrides)


def model_facts(model_config: dict[str, Any], seq_len: int) -> tuple[int, float]:
    """Parameter count and training FLOPs per token of the model, built on the meta device (no memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from trainer.models import count_params, flops_per_token

    cfg = dict(model_config)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return count_params(model), flops_per_token(model, seq_len)


def save_windows(cfg: Any, work: Path, steps: int, batch: int) -> tuple[Path, int]:
    """The token windows of every step in the trainer's sample order (what its train_step takes), saved once."""
    import datasets

    from trainer.data import SampleOrder, build_data

    datasets.disable_progress_bars()
    data = build_data(cfg.data, run_dir=work)
    if len(data.train) < batch:
        raise SystemExit(
            f"pydoc gives {len(data.train)} windows of {cfg.data.seq_len} tokens, fewer than --batch {batch}"
        )
    order = SampleOrder(len(data.train), seed=cfg.train.seed)
    idx = torch.cat([order.take(batch) for _ in range(steps)])
    taken = data.train.batch(idx)
    inputs, labels = taken.inputs, taken.labels
    path = work / "windows.pt"
    torch.save({"inputs": inputs.clone(), "labels": labels.clone()}, path)
    return path, len(data.tokenizer)


# ---- running the workers and reporting ---------------------------------------------------------------------


def run_worker(spec: Spec, timeout: float) -> Result:
    """One variant in a fresh Python process; its output goes to a log, shown only if it fails."""
    return Result(**run_script_worker(spec, timeout, Path(__file__)))


def run_script_worker(spec: Any, timeout: float, script: Path) -> dict[str, Any]:
    """`script --worker SPEC RESULT` in a fresh Python process (bench/sft.py's workers too): the spec (a
    dataclass with work_dir, threads and label) written as JSON, the result read back; the output goes to a
    log, shown only if it fails."""
    vdir = Path(spec.work_dir)
    vdir.mkdir(parents=True, exist_ok=True)
    spec_path, result_path, log_path = vdir / "spec.json", vdir / "result.json", vdir / "log.txt"
    spec_path.write_text(json.dumps(asdict(spec), indent=1))
    result_path.unlink(missing_ok=True)
    env = {
        **os.environ,
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
    }
    if spec.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(spec.threads)
    cmd = [sys.executable, str(script.resolve()), "--worker", str(spec_path), str(result_path)]
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
    if proc.returncode != 0 or not result_path.exists():
        tail = "\n".join(log_path.read_text().splitlines()[-30:])
        raise SystemExit(f"{spec.label} failed (exit {proc.returncode}); last lines of {log_path}:\n{tail}")
    return json.loads(result_path.read_text())


def summarize(label: str, runs: list[Result], flops_per_token: float, peak: float) -> dict[str, Any]:
    tps = statistics.median(r.tokens_per_s for r in runs)
    reported = [r.reported_tokens_per_s for r in runs if r.reported_tokens_per_s]
    return {
        "label": label,
        "kind": runs[0].kind,
        "tokens_per_s": tps,
        "tokens_per_s_runs": [r.tokens_per_s for r in runs],
        "reported_tokens_per_s": statistics.median(reported) if reported else None,
        "peak_rss_mib": max(r.peak_rss_mib for r in runs),
        "setup_rss_mib": max(r.setup_rss_mib for r in runs),
        "mfu": tps * flops_per_token / peak,
        "first_loss": runs[0].losses[0],
        "last_loss": runs[0].losses[-1],
        "losses": runs[0].losses,
    }


def compare(t: dict[str, Any], plain: dict[str, Any], hf: dict[str, Any]) -> dict[str, Any]:
    c = {
        "trainer": t["label"],
        "speed_vs_plain": t["tokens_per_s"] / plain["tokens_per_s"],
        "speed_vs_hf": t["tokens_per_s"] / hf["tokens_per_s"],
        "memory_vs_plain": t["peak_rss_mib"] / plain["peak_rss_mib"],
        "memory_vs_hf": t["peak_rss_mib"] / hf["peak_rss_mib"],
    }
    c["targets"] = {
        f"speed >= {TARGET_VS_PLAIN}x plain": c["speed_vs_plain"] >= TARGET_VS_PLAIN,
        f"speed >= {TARGET_VS_HF}x HF Trainer": c["speed_vs_hf"] >= TARGET_VS_HF,
        "lower peak memory than both": c["memory_vs_plain"] < 1.0 and c["memory_vs_hf"] < 1.0,
    }
    c["all_targets_met"] = all(c["targets"].values())
    return c


def print_report(
    setup: dict[str, Any], rows: list[dict[str, Any]], comparisons: list[dict[str, Any]]
) -> None:
    s = setup
    print(
        f"\nmodel: llama {s['num_params'] / 1e6:.2f}M params (vocab {s['model_vocab']}, hidden {s['hidden']}, "
        f"{s['layers']} layers, tied), {s['flops_per_token'] / 1e6:.1f} MFLOP/token, fp32 on CPU, {s['threads']} threads\n"
        f"batch {s['batch']} x {s['seq_len']} tokens, {s['steps']} steps ({s['warmup']} untimed), "
        f"{s['repeats']} repeat(s); CPU peak {s['peak_flops'] / 1e9:.1f} GFLOP/s"
    )
    width = max(len(r["label"]) for r in rows)
    print(
        f"\n{'variant':<{width}}  {'tokens/s':>9}  {'peak MiB':>8}  {'setup MiB':>9}  {'MFU':>6}  {'loss@1':>7}  {'loss@end':>8}"
    )
    for r in rows:
        print(
            f"{r['label']:<{width}}  {r['tokens_per_s']:>9,.0f}  {r['peak_rss_mib']:>8,.0f}  {r['setup_rss_mib']:>9,.0f}  "
            f"{100 * r['mfu']:>5.1f}%  {r['first_loss']:>7.4f}  {r['last_loss']:>8.4f}"
        )
    first = [r["first_loss"] for r in rows]
    if max(first) - min(first) > 1e-3 * max(first):
        print("WARNING: the step-1 losses differ: the variants do not see the same weights/targets")
    if comparisons:
        print("\ntrainer vs plain loop / vs HF Trainer (tokens/s ratio, peak-memory ratio):")
    for c in comparisons:
        marks = ", ".join(f"{k}: {'yes' if ok else 'NO'}" for k, ok in c["targets"].items())
        print(
            f"  {c['trainer']}: speed {c['speed_vs_plain']:.2f}x / {c['speed_vs_hf']:.2f}x, "
            f"memory {c['memory_vs_plain']:.2f}x / {c['memory_vs_hf']:.2f}x -> {marks}"
        )


# ---- command line ------------------------------------------------------------------------------------------


def parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke check in under a minute")
    p.add_argument("--steps", type=int, help=f"optimizer steps per variant (default {REALISTIC['steps']})")
    p.add_argument(
        "--warmup", type=int, help=f"first steps left out of the timing (default {REALISTIC['warmup']})"
    )
    p.add_argument("--batch", type=int, help=f"sequences per step (default {REALISTIC['batch']})")
    p.add_argument("--seq-len", type=int, help=f"tokens per sequence (default {REALISTIC['seq_len']})")
    p.add_argument("--vocab", type=int, help=f"BPE vocabulary size (default {REALISTIC['vocab']})")
    p.add_argument("--hidden", type=int, help=f"model width (default {REALISTIC['hidden']})")
    p.add_argument("--layers", type=int, help=f"transformer blocks (default {REALISTIC['layers']})")
    p.add_argument("--intermediate", type=int, default=None, help="MLP width (default 3 x hidden)")
    p.add_argument("--heads", type=int, default=None, help="attention heads (default hidden / 64)")
    p.add_argument(
        "--loss-chunk-size",
        type=int,
        nargs="+",
        default=None,
        help="trainer setting(s); 0 = full logits (default: conf/)",
    )
    p.add_argument(
        "--compile",
        type=parse_bool,
        nargs="+",
        default=None,
        help="trainer setting(s): true/false (default: conf/)",
    )
    p.add_argument(
        "--only",
        nargs="+",
        choices=["trainer", "plain", "hf"],
        default=["trainer", "plain", "hf"],
        help="variants to run",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per variant (default: all cores); 1 is steadier on a busy machine",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="run every variant this many times, interleaved; report the median",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="torch.profiler over the timed steps (slows them); tables in the work dir",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"JSON results (default {DEFAULT_OUT.relative_to(REPO)})",
    )
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed per variant run")
    p.add_argument("--worker", nargs=2, metavar=("SPEC", "RESULT"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    for key, value in (QUICK if a.quick else REALISTIC).items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    if not 1 <= a.warmup < a.steps:
        p.error(f"--warmup must be in [1, --steps); got --warmup {a.warmup} --steps {a.steps}")
    return a


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    if a.worker:
        worker_main(Path(a.worker[0]), Path(a.worker[1]))
        return

    from trainer.metrics import measure_cpu_peak_flops

    started = time.perf_counter()
    out = a.out.resolve()
    work = out.parent / f"{out.stem}-work"
    work.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = build_tokenizer(a.vocab, DEFAULT_OUT.parent / "tokenizers" / f"bpe-{a.vocab}")
    if a.threads:
        torch.set_num_threads(a.threads)
    # Once, before any variant runs, with the variants' thread count; best of 20 matmuls to ride out other load.
    peak = measure_cpu_peak_flops(repeats=20)

    base = trainer_overrides(a, tokenizer_dir, work / "data", peak)
    cfg = compose_config(base)
    windows, tokenizer_len = save_windows(cfg, work, a.steps, a.batch)
    from trainer.models import build_model_config

    model_config = build_model_config(cfg.model, vocab_size=tokenizer_len).to_diff_dict()
    model_config["model_type"] = cfg.model.arch.model_type
    num_params, fpt = model_facts(model_config, a.seq_len)

    o = cfg.optimizer
    common = dict(
        steps=a.steps,
        warmup=a.warmup,
        batch=a.batch,
        seq_len=a.seq_len,
        seed=cfg.train.seed,
        lr=o.lr,
        weight_decay=o.weight_decay,
        betas=tuple(o.betas),
        eps=o.eps,
        grad_clip=cfg.train.grad_clip,
        model_config=model_config,
        windows=str(windows),
        profile=a.profile,
        threads=a.threads,
    )
    specs: list[Spec] = []
    if "trainer" in a.only:
        chunks = a.loss_chunk_size or [cfg.train.loss_chunk_size]
        compiles = a.compile or [cfg.train.compile]
        for chunk, comp in itertools.product(chunks, compiles):
            shown = "auto" if chunk is None else chunk
            label = f"trainer (chunk {shown}, {'compiled' if comp else 'eager'})"
            extra = [
                f"train.loss_chunk_size={'null' if chunk is None else chunk}",
                f"train.compile={str(comp).lower()}",
            ]
            tag = f"trainer-c{shown}-{'compile' if comp else 'eager'}"
            specs.append(
                Spec(kind="trainer", label=label, work_dir=str(work / tag), overrides=base + extra, **common)
            )
    if "plain" in a.only:
        specs.append(Spec(kind="plain", label="plain PyTorch loop", work_dir=str(work / "plain"), **common))
    if "hf" in a.only:
        specs.append(Spec(kind="hf", label="HF Trainer", work_dir=str(work / "hf"), **common))

    runs: dict[str, list[Result]] = {s.label: [] for s in specs}
    for r in range(a.repeats):
        for spec in specs:
            print(
                f"[{time.perf_counter() - started:5.0f}s] run {r + 1}/{a.repeats}: {spec.label} ...",
                flush=True,
            )
            result = run_worker(spec, a.timeout)
            print(
                f"        {result.tokens_per_s:,.0f} tokens/s, peak {result.peak_rss_mib:,.0f} MiB",
                flush=True,
            )
            runs[spec.label].append(result)

    rows = [summarize(label, rs, fpt, peak) for label, rs in runs.items()]
    by_kind = {r["kind"]: r for r in rows if r["kind"] != "trainer"}
    comparisons = []
    if "plain" in by_kind and "hf" in by_kind:
        comparisons = [compare(r, by_kind["plain"], by_kind["hf"]) for r in rows if r["kind"] == "trainer"]
    setup = {
        **{
            k: getattr(a, k)
            for k in ("steps", "warmup", "batch", "seq_len", "vocab", "hidden", "layers", "repeats")
        },
        "model_vocab": model_config["vocab_size"],
        "model_config": model_config,
        "num_params": num_params,
        "flops_per_token": fpt,
        "peak_flops": peak,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "trainer_overrides": base,
        "optimizer": {
            "lr": o.lr,
            "betas": list(o.betas),
            "eps": o.eps,
            "weight_decay": o.weight_decay,
            "grad_clip": cfg.train.grad_clip,
        },
    }
    print_report(setup, rows, comparisons)
    trainers = [r for r in rows if r["kind"] == "trainer"]
    best = max(trainers, key=lambda r: r["tokens_per_s"])["label"] if trainers else None
    if len(trainers) > 1:
        print(f"fastest trainer setting: {best}")
    out.write_text(
        json.dumps(
            {"setup": setup, "results": rows, "comparisons": comparisons, "fastest_trainer": best}, indent=1
        )
    )
    print(f"\nresults: {out} ({time.perf_counter() - started:.0f}s in all)")


if __name__ == "__main__":
    main()
