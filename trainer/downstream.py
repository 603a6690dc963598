"""Downstream accuracy: lm-evaluation-harness tasks on a model loaded our way (`trainer.evaluate tasks=[...]`).

lm-eval by itself loads only what transformers loads; here each model (a checkpoint, hf/, a trainer.quantize
output, a GGUF or compressed-tensors export) is loaded by `trainer.evaluate` and handed to lm-eval's HF wrapper
as a model object, so every model evaluate measures also gets task accuracies, computed by lm-eval's own code
(`simple_evaluate`): the same numbers its command line gives on a directory it can load.

The tasks are lm-eval's registered ones (downloaded from the hub where it is reachable) and those of
`lm_eval.include_path`, a directory of the user's task YAMLs (lm_eval_tasks/ holds local ones made here).
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn

from trainer.errors import ConfigError, InputNotFoundError
from trainer.utils import require


def _lm_eval() -> Any:
    return require("lm_eval", extra="eval", package="lm-eval")


def task_manager(tasks: list[str], opts: Any) -> Any:
    """lm-eval's task index for `tasks`, checked before any model loads: that of `opts.include_path` alone when
    it holds them all (indexing lm-eval's ~15,000 task files takes ~10 s of CPU), else lm-eval's own with it."""
    from lm_eval.tasks import TaskManager

    include = opts.include_path
    if include is not None:
        path = Path(include)
        if not path.is_dir():
            raise InputNotFoundError(
                f"lm_eval.include_path={include}: no such directory; give a directory of task YAML files "
                "(lm-eval's format), e.g. lm_eval.include_path=lm_eval_tasks, or null for lm-eval's own tasks"
            )
        local = TaskManager(include_path=str(path), include_defaults=False)
        if not local.all_tasks:
            raise ConfigError(
                f"lm_eval.include_path={include}: holds no lm-eval task (no YAML file with a `task:` key); "
                "give the directory of your task YAMLs, or null for lm-eval's own tasks"
            )
        if set(tasks) <= set(local.all_tasks):
            return local
    manager = TaskManager(include_path=None if include is None else str(include))
    known = set(manager.all_tasks)
    for task in tasks:
        if task not in known:
            near = difflib.get_close_matches(task, sorted(known), n=3)
            hint = f" (did you mean {', '.join(near)}?)" if near else ""
            where = "lm-eval's tasks" + (f" or {include}" if include else "")
            raise ConfigError(
                f"tasks: {task!r} is not a task of {where}{hint}; list them with `lm_eval ls tasks`, or give "
                "lm_eval.include_path=DIR for a directory of your own task YAMLs"
            )
    return manager


def check_tasks(tasks: list[str], opts: Any) -> Any:
    """The task manager for `tasks`, after checking the options and that every task exists."""
    _lm_eval()
    if opts.limit is not None and opts.limit < 1:
        raise ConfigError(
            f"lm_eval.limit={opts.limit}: must be >= 1 (examples per task), or null for every example"
        )
    if opts.num_fewshot is not None and opts.num_fewshot < 0:
        raise ConfigError(
            f"lm_eval.num_fewshot={opts.num_fewshot}: must be >= 0, or null for each task's own"
        )
    if opts.batch_size < 1:
        raise ConfigError(f"lm_eval.batch_size={opts.batch_size}: must be >= 1")
    return task_manager(list(tasks), opts)


def _config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def task_results(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each task's metrics from simple_evaluate's results: {task: {metric: value, metric_stderr: value,
    "examples": n, "version": v, "config_hash": h}} (lm-eval's "metric,filter" keys, filter "none" dropped)."""
    out: dict[str, dict[str, Any]] = {}
    for task, values in results["results"].items():
        metrics: dict[str, Any] = {}
        for key, value in values.items():
            if "," not in key:
                continue  # alias, name
            metric, filt = key.split(",", 1)
            metrics[metric if filt == "none" else f"{metric},{filt}"] = None if value == "N/A" else value
        samples = results.get("n-samples", {}).get(task, {})
        metrics["examples"] = samples.get("effective")
        metrics["version"] = results.get("versions", {}).get(task)
        if task in results.get("configs", {}):
            metrics["config_hash"] = _config_hash(results["configs"][task])
        out[task] = metrics
    return out


def evaluate_tasks(model: nn.Module, tokenizer: Any, tasks: list[str], opts: Any, manager: Any) -> dict:
    """lm-eval's `simple_evaluate` of `tasks` on this model object: {"tasks": task_results, "lm_eval": what the
    numbers depend on (the lm-eval version, few-shot, limit, seed)}."""
    lm_eval = _lm_eval()
    from lm_eval.models.huggingface import HFLM

    model.eval()
    with _lm_eval_quiet():
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=opts.batch_size)
        if not sys.stderr.isatty():  # a log file gets no progress bars, one line per model (ours) instead
            for name in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
                setattr(lm, name, functools.partial(getattr(lm, name), disable_tqdm=True))
        results = _simple_evaluate(lm_eval, lm, tasks, opts, manager)
    return {
        "tasks": task_results(results),
        "lm_eval": {
            "version": lm_eval.__version__,
            "num_fewshot": opts.num_fewshot,
            "limit": opts.limit,
            "seed": opts.seed,
        },
    }


# lm-eval's warnings about being handed a model object (which is how we call it) and about task metadata we
# do not use; its INFO lines (seeds, the selected tasks, "pre-initialized model") repeat on every model.
_EXPECTED = {
    "lm_eval.models.huggingface": (
        "`pretrained` model kwarg is not of type `str`",
        "Passed an already-initialized model through `pretrained`",
    ),
    "lm_eval.api.task": ("Custom kwargs can be passed to `--metadata`",),
}


class _DropExpected(logging.Filter):
    def __init__(self, messages: tuple[str, ...]) -> None:
        super().__init__()
        self.messages = messages

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not any(m in text for m in self.messages)


@contextmanager
def _lm_eval_quiet() -> Iterator[None]:
    root, level = logging.getLogger("lm_eval"), logging.getLogger("lm_eval").level
    root.setLevel(logging.WARNING)
    drops = {name: _DropExpected(messages) for name, messages in _EXPECTED.items()}
    for name, drop in drops.items():
        logging.getLogger(name).addFilter(drop)
    import datasets

    bars = datasets.is_progress_bar_enabled()
    if not sys.stderr.isatty():
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        root.setLevel(level)
        for name, drop in drops.items():
            logging.getLogger(name).removeFilter(drop)
        if bars:
            datasets.enable_progress_bars()


def _simple_evaluate(lm_eval: Any, lm: Any, tasks: list[str], opts: Any, manager: Any) -> dict:
    return lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        num_fewshot=opts.num_fewshot,
        limit=opts.limit,
        task_manager=manager,
        random_seed=opts.seed,
        numpy_random_seed=opts.seed,
        torch_random_seed=opts.seed,
        fewshot_random_seed=opts.seed,
        log_samples=False,
    )


def accuracy_line(tasks: dict[str, dict[str, Any]]) -> str:
    """`task acc 0.412 ± 0.024` for each task with an accuracy, for the console."""
    parts = []
    for task, m in tasks.items():
        metric = next((k for k in ("acc_norm", "acc", "exact_match") if isinstance(m.get(k), float)), None)
        if metric is not None:
            err = m.get(f"{metric}_stderr")
            parts.append(
                f"{task} {metric} {m[metric]:.3f}" + (f" ± {err:.3f}" if isinstance(err, float) else "")
            )
    return ", ".join(parts)
