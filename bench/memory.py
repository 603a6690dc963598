"""Model-state memory per rank (parameters, gradients, optimizer states) for ddp, fsdp and ZeRO-1/2/3.

Each strategy runs under ``torch.distributed.run`` with 2 ranks on CPU/gloo, in fp32 with the trainer's AdamW,
on a Llama built by the real ``trainer.loop.Trainer`` from the Hydra-composed ``conf/`` (so every strategy
sets itself up exactly as in training): hidden 320, 4 layers, MLP 960, the pydoc data's 8,192-token BPE
vocabulary, tied embeddings, ~7.9M parameters. The trainer scales DeepSpeed's buckets and ZeRO-3's
persistence threshold to the width (hidden^2 and 10 x hidden), so only the norms stay whole on every rank.

What is counted: the tensors each rank actually holds, found by walking the real objects, each distinct
storage once (keyed by ``untyped_storage().data_ptr()``, counted at its full ``nbytes()``, so views into one
flat buffer count once and padding or unused tails count too; storages freed to 0 bytes count nothing):

* ``params``: the module's parameters (FSDP2 DTensors as their local shard, ``.to_local()``) and
  DeepSpeed's flat buffers behind them (``bit16_groups_flat`` for ZeRO-1/2; ``fp16_partitioned_groups_flat``
  and each parameter's ``ds_tensor`` for ZeRO-3).
* ``grads``: every ``.grad`` met anywhere, and DeepSpeed's gradient storage (``averaged_gradients``,
  ``all_grad_tensors``, ``grads_in_partition`` for ZeRO-1/2; ``grad_partitions_flat_buffer`` and the
  per-parameter grad partitions for ZeRO-3).
* ``master``: DeepSpeed's fp32 master partitions (``single_partition_of_fp32_groups`` for ZeRO-1/2,
  ``fp32_partitioned_groups_flat`` for ZeRO-3), counted only when they are storages of their own: this is
  how the benchmark checks whether DeepSpeed keeps a separate fp32 master copy beside fp32 weights.
* ``optim``: the torch optimizer's state (AdamW's ``exp_avg``, ``exp_avg_sq``, ``step``); for DeepSpeed the
  inner optimizer's (``optimizer.optimizer.state``).
* ``other``: whatever else is reachable from the optimizer, the DeepSpeed engine, the DDP wrapper or the
  FSDP2 states (attributes, lists, dicts, ``.grad``; not into modules), e.g. DeepSpeed's reduce bucket
  (``ipg_buckets``) or FSDP2's unsharded parameters if still allocated. The JSON lists each storage by path.

When: one full ``Trainer.train_step()`` first (the optimizer states exist from then on), then the next
step's micro-batches are run by hand as ``train_step`` runs them (``trainer.module(inputs, labels,
num_targets=...)``, the strategy's backward; for DeepSpeed ``engine.backward`` without the ``engine.step``
that the strategy's ``backward`` also calls), and the model state is measured after each backward, before
the optimizer step frees the gradients; the largest is the headline. The default ``--grad-accum 2``
measures both a micro-step between boundaries (where ZeRO-1 holds whole gradients, as its formula says,
and FSDP with ``strategy.defer_grad_sync=true`` would hold unsharded ones) and the boundary (gradients
reduced/partitioned, optimizer states present): the peak of model state over a step for every strategy. Then the step is finished
and measured again (``after_step``, in the JSON). Not in the totals: buffers allocated and freed *inside*
backward (ZeRO-1/2's reduce bucket; a gradient hook records its largest size, printed beside the table)
and DDP's reducer buckets, which live in C++ (their size, from DDP's logging data, is printed too).

Formulas (Ψ = parameters, N = 2 ranks): the ZeRO paper's 2Ψ + 2Ψ + KΨ adapted to fp32 with Adam, where
the fp32 weights are themselves the master copy, so K = 8 (exp_avg and exp_avg_sq):

* ddp: 4Ψ + 4Ψ + 8Ψ                 zero1: 4Ψ + 4Ψ + 8Ψ/N
* zero2: 4Ψ + (4Ψ + 8Ψ)/N           zero3 and fsdp: (4Ψ + 4Ψ + 8Ψ)/N

For the DeepSpeed stages the ratio to the same formula with K = 12 (a separate fp32 master partition
counted with the optimizer states, as DeepSpeed lays it out) is printed too. Targets: every strategy
within 10% of its K = 8 formula; zero3 and fsdp at most 0.55x ddp (measured totals).

    .venv/bin/python bench/memory.py                              # all five strategies, ~2 minutes on 2 cores
    .venv/bin/python bench/memory.py --strategies ddp zero3       # a subset
    .venv/bin/python bench/memory.py --reduce-bucket-size 102400  # DeepSpeed's reduce bucket (elements)
    .venv/bin/python bench/memory.py --grad-accum 1               # measure at the boundary only
    .venv/bin/python bench/memory.py --quick                      # smoke check: ddp and zero3, tiny model
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # measure the trainer/ of this checkout

import torch  # noqa: E402 - after the path set-up
from torch import nn  # noqa: E402
from torch.distributed.fsdp import FSDPModule  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

DEFAULT_OUT = REPO / "bench" / "out" / "memory.json"
STRATEGIES = ("ddp", "fsdp", "zero1", "zero2", "zero3")
WORLD_SIZE = 2
TOLERANCE = 0.10  # measured/formula must lie within 1 +- this
MAX_VS_DDP = 0.55  # zero3 and fsdp must hold at most this fraction of ddp's bytes
CATEGORIES = ("params", "grads", "master", "optim", "other")
LISTED_BYTES = 64 * 1024  # storages at least this big are listed one by one in the JSON
MIB = 2**20


# ---- the model-state ledger ------------------------------------------------------------------------------


@dataclass
class Entry:
    category: str
    path: str
    nbytes: int
    shape: list[int]
    dtype: str


class Ledger:
    """Distinct storages a rank holds, each under the first category it was seen with."""

    def __init__(self) -> None:
        self.entries: dict[tuple[str, int], Entry] = {}

    def add(self, tensor: torch.Tensor, category: str, path: str) -> None:
        if isinstance(tensor, DTensor):
            tensor = tensor.to_local()  # this rank's shard
        if tensor.is_meta:
            return
        storage = tensor.untyped_storage()
        if storage.nbytes() == 0:  # freed (resized to 0) or empty
            return
        key = (str(tensor.device), storage.data_ptr())
        if key not in self.entries:
            self.entries[key] = Entry(category, path, storage.nbytes(), list(tensor.shape), str(tensor.dtype))

    def add_all(self, tensors: Any, category: str, path: str) -> None:
        """A tensor, or tensors in (nested) lists, tuples and dict values."""
        if torch.is_tensor(tensors):
            self.add(tensors, category, path)
        elif isinstance(tensors, dict):
            for k, v in tensors.items():
                self.add_all(v, category, f"{path}[{k}]")
        elif isinstance(tensors, (list, tuple)):
            for i, v in enumerate(tensors):
                self.add_all(v, category, f"{path}[{i}]")

    def sweep(self, obj: Any, path: str, *, depth: int = 0, visited: set[int] | None = None) -> None:
        """Every tensor reachable from obj (attributes of torch/DeepSpeed objects, containers, .grad) as 'other'.

        Modules are not entered: their parameters are walked on their own. A tensor's `.grad` counts as a
        gradient wherever it is met.
        """
        visited = set() if visited is None else visited
        if depth > 8 or id(obj) in visited:
            return
        visited.add(id(obj))
        if torch.is_tensor(obj):
            self.add(obj, "other", path)
            if obj.grad is not None:
                self.add(obj.grad, "grads", f"{path}.grad")
            return
        if isinstance(obj, nn.Module):
            return
        if isinstance(obj, dict):
            for k, v in obj.items():
                if torch.is_tensor(k):
                    self.sweep(k, f"{path}[key]", depth=depth + 1, visited=visited)
                name = type(k).__name__ if torch.is_tensor(k) else k
                self.sweep(v, f"{path}[{name}]", depth=depth + 1, visited=visited)
        elif isinstance(obj, (list, tuple, set)):
            for i, v in enumerate(obj):
                self.sweep(v, f"{path}[{i}]", depth=depth + 1, visited=visited)
        elif _walkable(obj):
            for k, v in vars(obj).items():
                self.sweep(v, f"{path}.{k}", depth=depth + 1, visited=visited)

    def totals(self) -> dict[str, int]:
        out = dict.fromkeys(CATEGORIES, 0)
        for e in self.entries.values():
            out[e.category] += e.nbytes
        out["total"] = sum(out[c] for c in CATEGORIES)
        return out

    def summary(self) -> dict[str, Any]:
        listed = sorted(
            (e for e in self.entries.values() if e.nbytes >= LISTED_BYTES), key=lambda e: -e.nbytes
        )
        small = [e for e in self.entries.values() if e.nbytes < LISTED_BYTES]
        return {
            "bytes": self.totals(),
            "storages": [asdict(e) for e in listed],
            "small_storages": {"count": len(small), "bytes": sum(e.nbytes for e in small)},
        }


def _walkable(obj: Any) -> bool:
    """Plain Python objects of torch and DeepSpeed (optimizers, FSDP2 states, ZeRO internals)."""
    module = type(obj).__module__ or ""
    return (
        hasattr(obj, "__dict__")
        and not isinstance(obj, type)
        and module.split(".")[0] in ("torch", "deepspeed")
    )


# ---- what each strategy holds -------------------------------------------------------------------------------


def measure(trainer: Any) -> Ledger:
    """This rank's model state, walked from the trainer's module and optimizer."""
    ledger = Ledger()
    module, optimizer = trainer.module, trainer.optimizer
    zero_stage = getattr(trainer.strategy, "stage", None)

    for name, p in module.named_parameters():
        ledger.add(p, "params", f"param {name}")
        if hasattr(p, "ds_tensor"):  # ZeRO-3: this rank's partition of the parameter
            ledger.add(p.ds_tensor, "params", f"param {name}.ds_tensor")
    if zero_stage in (1, 2):
        ledger.add_all(optimizer.bit16_groups_flat, "params", "bit16_groups_flat")
    elif zero_stage == 3:
        ledger.add_all(optimizer.fp16_partitioned_groups_flat, "params", "fp16_partitioned_groups_flat")

    for name, p in module.named_parameters():
        if p.grad is not None:
            ledger.add(p.grad, "grads", f"param {name}.grad")
        if torch.is_tensor(getattr(p, "grad_accum", None)):  # DeepSpeed's accumulated gradient
            ledger.add(p.grad_accum, "grads", f"param {name}.grad_accum")
    if zero_stage in (1, 2):
        ledger.add_all(optimizer.averaged_gradients, "grads", "averaged_gradients")
        ledger.add_all(
            optimizer.all_grad_tensors, "grads", "all_grad_tensors"
        )  # accumulated between boundaries
        ledger.add_all(getattr(optimizer, "grads_in_partition", None), "grads", "grads_in_partition")
    elif zero_stage == 3:
        ledger.add_all(optimizer.grad_partitions_flat_buffer, "grads", "grad_partitions_flat_buffer")
        per_param = getattr(optimizer, "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition", {})
        ledger.add_all(per_param, "grads", "param_id_to_grad_partition")

    if zero_stage is not None:
        master = (
            optimizer.fp32_partitioned_groups_flat
            if zero_stage == 3
            else optimizer.single_partition_of_fp32_groups
        )
        ledger.add_all(master, "master", "fp32 master partition")
        for i, flat in enumerate(master):
            if flat.grad is not None:
                ledger.add(flat.grad, "grads", f"fp32 master partition[{i}].grad")
        inner = optimizer.optimizer  # the torch AdamW running on the flat partitions
    else:
        inner = optimizer
    for i, state in enumerate(inner.state.values()):
        ledger.add_all(state, "optim", f"optimizer.state[{i}]")

    # Anything else held along the way: buckets, gathered copies, stray gradients.
    ledger.sweep(optimizer, "optimizer")
    for name, value in vars(module).items():  # DDP's or DeepSpeed's wrapper (the modules inside are skipped)
        ledger.sweep(value, f"module.{name}")
    for name, m in module.named_modules():
        if isinstance(m, FSDPModule):  # FSDP2's per-unit state: sharded and unsharded parameters, buffers
            ledger.sweep(m._get_fsdp_state(), f"fsdp state {name or '<root>'}")
    return ledger


def ddp_bucket_bytes(module: nn.Module) -> int | None:
    """Bytes of DDP's flat gradient buckets (C++ reducer, not walkable), from DDP's logging data."""
    if not hasattr(module, "_get_ddp_logging_data"):
        return None
    data = module._get_ddp_logging_data()
    sizes = data.get("bucket_sizes")
    if isinstance(sizes, str):
        return sum(int(s) for s in sizes.split(",") if s.strip())
    return None


# ---- the worker: one strategy, launched by torch.distributed.run ----------------------------------------------


def model_overrides(a: argparse.Namespace) -> list[str]:
    return [
        "data=pydoc",  # real text, an 8,192-token BPE vocabulary (trained once, cached in the run dir)
        f"data.seq_len={a.seq_len}",
        f"model.arch.hidden_size={a.hidden}",
        f"model.arch.intermediate_size={3 * a.hidden}",
        f"model.arch.num_hidden_layers={a.layers}",
        f"model.arch.num_attention_heads={a.hidden // 64}",
        f"model.arch.num_key_value_heads={a.hidden // 64}",
        "train.dtype=float32",
        "optimizer=adamw",
        f"train.micro_batch_size={a.batch}",
        f"train.global_batch_size={a.batch * WORLD_SIZE * a.grad_accum}",
        "train.max_steps=2",
        "train.progress_bar=false",
        "train.export_hf=false",
        "checkpoint.every_steps=0",
    ]


def compose_config(overrides: list[str]) -> Any:
    from hydra import compose, initialize_config_dir

    from trainer.train import CONF_DIR  # registers the config schema

    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return compose("config", overrides=overrides)


def backward_micro_steps(trainer: Any) -> list[dict[str, Any]]:
    """The next step's micro-batches, forward and backward as `Trainer.train_step` runs them, stopping before
    the optimizer step; this rank's model state is measured after each backward (one summary per micro-batch).
    """
    from trainer.data import rank_micro_batches
    from trainer.distributed import all_reduce_sum

    t, env, module = trainer.cfg.train, trainer.env, trainer.module
    zero = hasattr(trainer.strategy, "engine")
    micro = rank_micro_batches(
        trainer.order.take(t.global_batch_size),
        micro_batch_size=t.micro_batch_size,
        rank=env.rank,
        world_size=env.world_size,
    )
    batches = [trainer.data.train.batch(idx) for idx in micro]
    local = torch.tensor(sum(int((b.labels != -100).sum()) for b in batches), device=trainer.device)
    num_targets_per_rank = int(all_reduce_sum(local).item()) / env.world_size
    module.train()
    summaries = []
    for i, (inputs, labels) in enumerate((b.inputs, b.labels) for b in batches):
        last = i == len(batches) - 1
        with trainer.strategy.accumulation_context(module, sync=last):
            loss = module(
                inputs.to(trainer.device), labels.to(trainer.device), num_targets=num_targets_per_rank
            )
            if zero:
                module.backward(loss, scale_wrt_gas=False)  # the strategy's backward would also engine.step()
            else:
                trainer.strategy.backward(module, loss)
        summaries.append(measure(trainer).summary())
        if zero and not last:
            module.step()  # not the boundary: DeepSpeed only counts the micro-step
    return summaries


def watch_buckets(trainer: Any) -> tuple[list[int], list[Any]]:
    """DeepSpeed's gradient buckets (`ipg_buckets`) as they grow during backward: [largest bytes seen], hooks.

    ZeRO-1/2 allocate the bucket while backward runs and free it at its end, so after backward it is gone;
    a hook after each gradient's accumulation records the largest size it reached.
    """
    peak = [0]
    buckets = getattr(trainer.optimizer, "ipg_buckets", None)
    if buckets is None:
        return peak, []

    def probe(_: torch.Tensor) -> None:
        ledger = Ledger()
        for dtype, bucket in buckets.items():
            ledger.add_all(bucket.buffer, "other", f"ipg_buckets[{dtype}].buffer")
        peak[0] = max(peak[0], ledger.totals()["total"])

    params = [p for p in trainer.module.parameters() if p.requires_grad]
    return peak, [p.register_post_accumulate_grad_hook(probe) for p in params]


def finish_step(trainer: Any) -> None:
    if hasattr(trainer.strategy, "engine"):
        trainer.module.step()  # at the boundary: reduce, clip, step, free the gradient partitions
    else:
        trainer.strategy.clip_and_step(trainer.module, trainer.optimizer, trainer.cfg.train.grad_clip)


def worker(a: argparse.Namespace) -> None:
    """One rank: measure, gather every rank's numbers, rank 0 writes them to `a.result`."""
    import torch.distributed as dist

    from trainer.distributed import barrier, destroy, read_env

    env = read_env()
    try:
        mine, about = measure_strategy(a, env)  # the trainer is gone when this returns
        ranks: list[Any] = [None] * env.world_size
        dist.all_gather_object(ranks, mine)
        if env.is_main:
            Path(a.result).write_text(json.dumps({**about, "ranks": ranks}, indent=1))
        barrier()
    finally:
        # After the DDP reducer is freed: freeing it after the process group can hang gloo's teardown.
        destroy()


def measure_strategy(a: argparse.Namespace, env: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """One full step, then the next step's backward(s) measured, then its optimizer step and a last measure."""
    from trainer.loop import Trainer

    overrides = [f"strategy={a.worker}", *model_overrides(a)]
    if a.reduce_bucket_size and a.worker.startswith("zero"):
        overrides.append(f"+strategy.deepspeed.zero_optimization.reduce_bucket_size={a.reduce_bucket_size}")
    trainer = Trainer(compose_config(overrides), run_dir=a.run_dir, env=env)
    trainer.train_step()  # the optimizer states exist from the first step on
    bucket_peak, hooks = watch_buckets(trainer)
    per_micro_step = backward_micro_steps(trainer)
    for hook in hooks:
        hook.remove()
    peak = max(range(len(per_micro_step)), key=lambda i: per_micro_step[i]["bytes"]["total"])
    finish_step(trainer)
    mine = {
        "rank": env.rank,
        "after_backward": per_micro_step[peak],  # the largest over the micro-steps
        "peak_micro_step": peak,
        "after_backward_totals": [m["bytes"] for m in per_micro_step],
        "after_step": measure(trainer).summary(),
        "ddp_reducer_bucket_bytes": ddp_bucket_bytes(trainer.module),
        "zero_bucket_peak_in_backward_bytes": bucket_peak[0] if hooks else None,
    }
    about = {
        "strategy": a.worker,
        "num_params": trainer.num_params,
        "overrides": overrides,
        "deepspeed_config": _deepspeed_config(trainer),
    }
    return mine, about


def _deepspeed_config(trainer: Any) -> dict[str, Any] | None:
    engine = getattr(trainer.strategy, "engine", None)
    if engine is None:
        return None
    zero = engine._config.zero_config
    return {
        "stage": zero.stage,
        "reduce_bucket_size": zero.reduce_bucket_size,
        "contiguous_gradients": zero.contiguous_gradients,
    }


# ---- formulas and the report ---------------------------------------------------------------------------------

# Which model-state parts each strategy divides over the ranks.
SHARDED = {
    "ddp": (),
    "zero1": ("optim",),
    "zero2": ("grads", "optim"),
    "zero3": ("params", "grads", "optim"),
    "fsdp": ("params", "grads", "optim"),
}


def formula_bytes(
    strategy: str, num_params: int, world_size: int, *, master: bool = False
) -> dict[str, float]:
    """The ZeRO paper's per-rank model state in fp32 with Adam: 4Ψ params, 4Ψ grads, 8Ψ (12Ψ with master) states."""
    per_param = {"params": 4, "grads": 4, "optim": 12 if master else 8}
    out = {k: v * num_params / (world_size if k in SHARDED[strategy] else 1) for k, v in per_param.items()}
    out["total"] = sum(out.values())
    return out


def run_strategy(strategy: str, a: argparse.Namespace, logs: Path) -> dict[str, Any]:
    result = logs / f"{strategy}.json"
    log = logs / f"{strategy}.log"
    result.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(WORLD_SIZE),
        "--master_port",
        str(_free_port()),
        str(Path(__file__).resolve()),
        "--worker",
        strategy,
        "--result",
        str(result),
        "--run-dir",
        str(a.run_dir),
        *_size_args(a),
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), PYTHONPATH=str(REPO))
    start = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=a.timeout)
    if proc.returncode != 0 or not result.exists():
        tail = log.read_text()[-4000:]
        raise RuntimeError(f"strategy={strategy} failed (exit {proc.returncode}); log {log}:\n{tail}")
    out = json.loads(result.read_text())
    out["seconds"] = time.perf_counter() - start
    return out


def _size_args(a: argparse.Namespace) -> list[str]:
    args = [
        "--hidden",
        str(a.hidden),
        "--layers",
        str(a.layers),
        "--seq-len",
        str(a.seq_len),
        "--batch",
        str(a.batch),
        "--grad-accum",
        str(a.grad_accum),
        "--world-size",
        str(a.world_size),
    ]
    if a.reduce_bucket_size:
        args += ["--reduce-bucket-size", str(a.reduce_bucket_size)]
    return args


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def planned_bytes(overrides: list[str]) -> float:
    """The model state per rank that `python -m trainer.plan` predicts for the same config on 2 ranks:
    parameters, gradients, optimizer states and master partition (what this benchmark walks)."""
    from hydra import initialize_config_dir

    from trainer.plan.__main__ import CONF_DIR, compose_plan
    from trainer.plan.planner import Planner

    plan_args = ["plan.gpu=cpu", f"plan.gpus_per_node={WORLD_SIZE}", "plan.alternatives=false"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg, plan = compose_plan([*overrides, *plan_args])
    from trainer.plan.memory import model_states
    from trainer.strategies.layout import strategy_layout

    planner = Planner(cfg, plan)
    states = model_states(planner.counts, planner.setup(strategy_layout(cfg.strategy)))
    return sum(states[k] for k in ("parameters", "gradients", "optimizer states", "fp32 master"))


def analyse(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per strategy: the largest rank's bytes, the formulas, the ratios, and the targets."""
    rows: dict[str, Any] = {}
    for strategy, r in results.items():
        n = r["num_params"]
        worst = max(r["ranks"], key=lambda x: x["after_backward"]["bytes"]["total"])
        measured = worst["after_backward"]["bytes"]
        formula = formula_bytes(strategy, n, WORLD_SIZE)
        row = {
            "num_params": n,
            "measured": measured,
            "measured_per_rank": [x["after_backward"]["bytes"]["total"] for x in r["ranks"]],
            "after_step_per_rank": [x["after_step"]["bytes"]["total"] for x in r["ranks"]],
            "formula": formula,
            "ratio_to_formula": measured["total"] / formula["total"],
            # trainer.plan's prediction of the same model state (docs/plan.md)
            "plan_ratio": planned_bytes(r["overrides"]) / measured["total"],
            "separate_fp32_master": measured["master"] > 0,
        }
        if strategy.startswith("zero"):
            with_master = formula_bytes(strategy, n, WORLD_SIZE, master=True)
            row["formula_with_master"] = with_master
            row["ratio_to_formula_with_master"] = measured["total"] / with_master["total"]
        rows[strategy] = row
    ddp = rows.get("ddp")
    for strategy, row in rows.items():
        row["ratio_to_ddp"] = row["measured"]["total"] / ddp["measured"]["total"] if ddp else None
        targets = {"within_10pct_of_formula": abs(row["ratio_to_formula"] - 1) <= TOLERANCE}
        if strategy in ("zero3", "fsdp") and ddp and WORLD_SIZE > 1:
            targets["at_most_0.55x_ddp"] = row["ratio_to_ddp"] <= MAX_VS_DDP
        row["targets"] = targets
    return rows


def _cell(value: float | None, width: int = 7, digits: int = 3) -> str:
    return f"{'':>{width}}" if value is None else f"{value:{width}.{digits}f}"


def print_report(results: dict[str, dict[str, Any]], rows: dict[str, Any]) -> None:
    n = next(iter(rows.values()))["num_params"]
    print(
        f"\nΨ = {n:,} parameters; {WORLD_SIZE} ranks; fp32 AdamW; model state per rank after backward (largest rank)"
    )
    print(
        "columns params..total in bytes per parameter (B/Ψ); formula: 4Ψ params + 4Ψ grads + 8Ψ Adam, sharded per stage\n"
    )
    head = (
        f"{'strategy':8} {'params':>7} {'grads':>7} {'master':>7} {'optim':>7} {'other':>7} | {'total':>7} {'MiB':>8}"
        f" | {'formula':>7} {'meas/f':>7} {'w/ mst':>7} {'vs ddp':>7}"
    )
    print(head)
    print("-" * len(head))
    for strategy, row in rows.items():
        m = row["measured"]
        parts = " ".join(_cell(m[c] / n, digits=2) for c in CATEGORIES)
        print(
            f"{strategy:8} {parts} | {_cell(m['total'] / n, digits=2)} {m['total'] / MIB:8.2f}"
            f" | {_cell(row['formula']['total'] / n, digits=2)} {_cell(row['ratio_to_formula'])}"
            f" {_cell(row.get('ratio_to_formula_with_master'))} {_cell(row['ratio_to_ddp'])}"
        )
    print(
        "meas/f: measured / formula (K = 8); w/ mst: measured / formula with a separate fp32 master (K = 12)"
    )
    print("trainer.plan / measured: " + ", ".join(f"{s} {row['plan_ratio']:.3f}" for s, row in rows.items()))

    print("\nnot in the totals above:")
    for strategy, r in results.items():
        rank0 = r["ranks"][0]
        if rank0.get("ddp_reducer_bucket_bytes"):
            b = rank0["ddp_reducer_bucket_bytes"]
            print(
                f"  {strategy:6} DDP reducer buckets (C++, not walkable): {b / MIB:.2f} MiB = {b / n:.2f} B/Ψ"
            )
        if rank0.get("zero_bucket_peak_in_backward_bytes") is not None:
            b = max(x["zero_bucket_peak_in_backward_bytes"] for x in r["ranks"])
            after = sum(
                s["nbytes"] for s in rank0["after_backward"]["storages"] if "ipg_buckets" in s["path"]
            )
            state = "still held after backward (in 'other')" if after else "freed at the end of backward"
            print(
                f"  {strategy:6} DeepSpeed reduce bucket, largest inside backward: {b / MIB:.2f} MiB, {state}"
            )
    print("\nlargest 'other' storages (rank 0):")
    for strategy, r in results.items():
        others = [s for s in r["ranks"][0]["after_backward"]["storages"] if s["category"] == "other"]
        for s in others[:3]:
            print(f"  {strategy:6} {s['nbytes'] / MIB:10.2f} MiB  {s['path']}  {s['shape']} {s['dtype']}")
    print(f"\ntargets: each within {TOLERANCE:.0%} of its formula; zero3 and fsdp <= {MAX_VS_DDP}x ddp")
    for strategy, row in rows.items():
        for name, ok in row["targets"].items():
            print(f"  {strategy:6} {name:26} {'PASS' if ok else 'FAIL'}")


# ---- entry point -------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    global WORLD_SIZE
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    p.add_argument("--hidden", type=int, default=320, help="model width (heads of 64)")
    p.add_argument("--layers", type=int, default=4, help="transformer blocks")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per sequence")
    p.add_argument("--batch", type=int, default=2, help="sequences per rank per micro-batch")
    p.add_argument(
        "--grad-accum",
        type=int,
        default=2,
        help="micro-batches per step (1: every backward is the accumulation boundary)",
    )
    p.add_argument(
        "--reduce-bucket-size",
        type=int,
        default=None,
        help="DeepSpeed zero_optimization.reduce_bucket_size in elements (default: the trainer's, hidden^2)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument(
        "--world-size", type=int, default=WORLD_SIZE, help="ranks (1: a one-rank group per strategy)"
    )
    p.add_argument("--timeout", type=int, default=600, help="seconds per strategy")
    p.add_argument(
        "--run-dir", type=Path, default=REPO / "bench" / "out" / "memory_run", help=argparse.SUPPRESS
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument(
        "--quick", action="store_true", help="ddp and zero3 on a 2-layer, 64-wide Llama: checks the script"
    )
    a = p.parse_args(argv)
    WORLD_SIZE = a.world_size  # every function below reads it, the workers' too (passed on by _size_args)
    if a.quick:
        a.hidden, a.layers, a.seq_len = 64, 2, 32
        if a.strategies == list(STRATEGIES):
            a.strategies = ["ddp", "zero3"]
    return a


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    if a.worker:
        worker(a)
        return
    logs = a.run_dir / "logs"  # one log and one raw result per strategy
    logs.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    for strategy in a.strategies:
        results[strategy] = run_strategy(strategy, a, logs)
        print(f"{strategy}: done in {results[strategy]['seconds']:.0f}s", flush=True)
    rows = analyse(results)
    print_report(results, rows)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"world_size": WORLD_SIZE, "settings": vars(a) | {"run_dir": str(a.run_dir), "out": str(a.out)}}
    a.out.write_text(json.dumps({**report, "summary": rows, "runs": results}, indent=1, default=str))
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
