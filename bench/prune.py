"""Perplexity of one-shot pruning at 50% (magnitude, Wanda, SparseGPT, and 2:4), before and after pruning-aware
fine-tuning with and without distillation from the dense model, beside the dense model fine-tuned the same way.

1. A dense model is trained on the embedded Markov corpus with the real trainer (`trainer.loop.Trainer`, the
   default job's model and data unless overridden), or read from `--dense RUN_DIR/hf`.
2. Each method prunes a copy of it with `trainer.prune.pruner.Pruner` (calibration: the run's training windows), timed.
3. Each pruned copy, and the dense model itself (the fair baseline: it gains from the extra steps too, so its
   gain is not "recovery"), is fine-tuned for the same steps on the same batches with AdamW, the pruned ones
   with their masks enforced by `trainer.prune.masks.MaskEnforcer` (the trainer's own mechanism). "+ KD"
   adds a distillation term from the dense model: loss = (1 - a) CE + a T^2 KL(teacher_T || student_T).
4. Perplexity on the whole eval split (exp of the mean token cross-entropy) at every stage, and the entropy
   floor of the source (the best any model can do).

    python bench/prune.py                        # ~1M-param Llama, 600 dense steps, 200 fine-tuning steps
    python bench/prune.py --quick                # smoke check, tiny sizes (< 2 minutes)
    python bench/prune.py --dense outputs/run/hf --finetune-steps 300 --kd-ratio 0.5 --kd-temperature 2
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "out" / "prune"
METHODS = {
    "magnitude": ["prune=magnitude", "prune.sparsity=0.5"],
    "wanda": ["prune=wanda", "prune.sparsity=0.5"],
    "sparsegpt": ["prune=sparsegpt", "prune.sparsity=0.5"],
    "sparsegpt 2:4": ["prune=nm", "prune.criterion=sparsegpt"],
    "wanda 2:4": ["prune=nm", "prune.criterion=wanda"],
}
QUICK = [
    "model.arch.hidden_size=32",
    "model.arch.intermediate_size=64",
    "model.arch.num_hidden_layers=2",
    "model.arch.num_attention_heads=2",
    "model.arch.num_key_value_heads=2",
    "data.seq_len=32",
    "data.markov.num_words=64",
    "data.markov.train_tokens=20000",
    "data.markov.eval_tokens=2000",
]


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from trainer.config import register_configs
    from trainer.train import CONF_DIR

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return hydra_compose("config", overrides=overrides)


def single_process_strategy():
    """The trainer's one-process strategy (what the masks ask where the tensors live), on the CPU."""
    from trainer.distributed import ParallelEnv
    from trainer.strategies import build_strategy

    return build_strategy(compose(["strategy=single"]), ParallelEnv(), torch.device("cpu"))


@torch.no_grad()
def perplexity(model, windows, *, batch_size: int) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        batch = windows.batch(torch.arange(i, min(i + batch_size, len(windows))))
        inputs, labels = batch.inputs, batch.labels
        logits = model(input_ids=inputs, use_cache=False).logits.float()
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
        total += float(loss)
        count += int((labels != -100).sum())
    return math.exp(total / count)


def finetune(model, teacher, train, *, steps, batch_size, lr, kd_ratio, kd_temperature, masks, seed):
    """AdamW on the same batches for every variant; masks (if any) enforced after every step."""
    from trainer.prune.masks import MaskEnforcer

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    if masks:
        wrapper = torch.nn.Module()
        wrapper.model = model  # canonical names drop the wrapper's `model.` as the trainer's do
        enforcer = MaskEnforcer(masks, device=torch.device("cpu"))
        enforcer.attach(single_process_strategy(), wrapper, optimizer)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        lr_now = lr * min(1.0, (step + 1) / max(steps // 10, 1))  # short warmup, then constant
        for group in optimizer.param_groups:
            group["lr"] = lr_now
        batch = train.batch(torch.randint(0, len(train), (batch_size,), generator=g))
        inputs, labels = batch.inputs, batch.labels
        logits = model(input_ids=inputs, use_cache=False).logits.float()
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        if kd_ratio > 0:
            with torch.no_grad():
                target = teacher(input_ids=inputs, use_cache=False).logits.float()
            t = kd_temperature
            valid = (labels != -100).flatten()
            kd = F.kl_div(
                F.log_softmax(logits.flatten(0, 1)[valid] / t, -1),
                F.log_softmax(target.flatten(0, 1)[valid] / t, -1),
                log_target=True,
                reduction="batchmean",
            )
            loss = (1 - kd_ratio) * loss + kd_ratio * t * t * kd
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if masks:
        enforcer.detach()
    model.eval()
    return model


def sparsity(model, masks) -> float:
    params = dict(model.named_parameters())
    zeros = sum(int((params[n] == 0).sum()) for n in masks)
    return zeros / sum(m.numel() for m in masks.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke check")
    ap.add_argument("--dense", type=Path, default=None, help="an hf/ export to prune instead of training one")
    ap.add_argument(
        "--pretrained",
        action="store_true",
        help="the model the overrides load is the dense model: no training",
    )
    ap.add_argument("--dense-steps", type=int, default=600)
    ap.add_argument("--finetune-steps", type=int, default=200, help="0: one-shot perplexities only")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-4, help="fine-tuning learning rate (AdamW)")
    ap.add_argument("--kd-ratio", type=float, default=0.5)
    ap.add_argument("--kd-temperature", type=float, default=1.0)
    ap.add_argument("--calibration-batches", type=int, default=8)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=OUT / "prune.json")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for the model and data (e.g. data=pydoc)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.quick:
        a.dense_steps, a.finetune_steps, a.calibration_batches = 40, min(a.finetune_steps, 20), 2
    from transformers import AutoModelForCausalLM

    from trainer.distributed import ParallelEnv
    from trainer.loop import Trainer
    from trainer.prune.pruner import Pruner

    overrides = (QUICK if a.quick else []) + list(a.overrides)
    run_dir = a.out.parent / ("dense_quick" if a.quick else "dense")
    dense_overrides = [
        *overrides,
        f"train.max_steps={a.dense_steps}",
        f"train.micro_batch_size={a.batch}",
        f"train.global_batch_size={a.batch}",
        "train.eval_every=0",
        "checkpoint.every_steps=0",
        "checkpoint.at_end=false",
        "train.progress_bar=false",
    ]
    start = time.perf_counter()
    trainer = Trainer(compose(dense_overrides), run_dir=run_dir, env=ParallelEnv())
    if a.pretrained:
        dense = trainer.hf_model
    elif a.dense is None:
        trainer.train()
        dense = trainer.hf_model
    else:
        dense = AutoModelForCausalLM.from_pretrained(a.dense)
    print(
        f"dense model: {sum(p.numel() for p in dense.parameters()) / 1e6:.2f}M params, "
        f"{time.perf_counter() - start:.0f}s",
        flush=True,
    )
    dense.eval()
    data = trainer.data
    ppl = lambda m: perplexity(m, data.eval, batch_size=a.batch)  # noqa: E731
    kw = dict(steps=a.finetune_steps, batch_size=a.batch, lr=a.lr, kd_temperature=a.kd_temperature, seed=1)

    results: dict[str, dict] = {}
    base = ppl(dense)
    steps = a.finetune_steps
    tuned = (
        finetune(copy.deepcopy(dense), None, data.train, kd_ratio=0.0, masks=None, **kw) if steps else dense
    )
    results["dense"] = {"ppl": base, "ppl_finetuned": ppl(tuned) if steps else math.nan}
    print(f"dense: ppl {base:.3f} -> {results['dense']['ppl_finetuned']:.3f} after fine-tuning", flush=True)
    for method in a.methods:
        calibration = [] if method == "magnitude" else [f"prune.calibration_batches={a.calibration_batches}"]
        cfg = compose([*overrides, *METHODS[method], *calibration])
        model = copy.deepcopy(dense)
        pruner = Pruner(cfg.prune, env=ParallelEnv(), device=torch.device("cpu"), max_steps=1, seed=0)
        t0 = time.perf_counter()
        pruner.prepare(model, train_data=data.train, micro_batch_size=a.batch, resume=None)
        seconds = time.perf_counter() - t0
        r = {"seconds": seconds, "sparsity": sparsity(model, pruner.masks), "ppl": ppl(model)}
        r |= {
            k: math.nan
            for k in ("ppl_finetuned", "ppl_finetuned_kd", "sparsity_finetuned", "sparsity_finetuned_kd")
        }
        for label, ratio in (("ppl_finetuned", 0.0), ("ppl_finetuned_kd", a.kd_ratio)) if steps else ():
            ft = finetune(copy.deepcopy(model), dense, data.train, kd_ratio=ratio, masks=pruner.masks, **kw)
            r[label] = ppl(ft)
            r[label.replace("ppl", "sparsity")] = sparsity(ft, pruner.masks)
        results[method] = r
        print(
            f"{method}: {seconds:.1f}s, sparsity {r['sparsity']:.4f}, ppl {r['ppl']:.3f} "
            f"({r['ppl'] / base:.2f}x dense) -> {r['ppl_finetuned']:.3f} fine-tuned, {r['ppl_finetuned_kd']:.3f} "
            f"with KD (sparsity after: {r['sparsity_finetuned']:.4f}, {r['sparsity_finetuned_kd']:.4f})",
            flush=True,
        )
    floor = data.entropy_floor
    print(f"\nentropy floor: ppl {math.exp(floor):.3f}" if floor else "")
    print(
        "| model | one-shot s | ppl pruned | x dense | ppl fine-tuned | x dense fine-tuned | ppl fine-tuned + KD | x |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    d = results["dense"]
    print(f"| dense | - | {d['ppl']:.3f} | 1.00 | {d['ppl_finetuned']:.3f} | 1.00 | - | - |")
    for method in a.methods:
        r = results[method]
        print(
            f"| {method} | {r['seconds']:.1f} | {r['ppl']:.3f} | {r['ppl'] / d['ppl']:.2f} | {r['ppl_finetuned']:.3f} | "
            f"{r['ppl_finetuned'] / d['ppl_finetuned']:.2f} | {r['ppl_finetuned_kd']:.3f} | "
            f"{r['ppl_finetuned_kd'] / d['ppl_finetuned']:.2f} |"
        )
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(
        json.dumps(
            {"args": {k: str(v) for k, v in vars(a).items()}, "entropy_floor": floor, "results": results},
            indent=2,
        )
    )
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
