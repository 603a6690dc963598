"""Entry point: `python -m trainer.plan [trainer.train's overrides] plan.gpu=h100 plan.gpus_per_node=8
plan.nodes=16` prints the peak memory per GPU and the step time of that training job, the largest micro-batch
that fits, and the alternatives that fit, fastest first; the model is never allocated (trainer/plan/).

Overrides that start with `plan.` are this command's (conf/plan.yaml); every other one is composed into the
training config exactly as trainer.train composes it. Exit status 0 when the job fits, 1 when it does not (the
plan says what would), 2 for bad input (one paragraph: trainer/cli.py).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir

from trainer.cli import run
from trainer.config import register_configs, validate_config
from trainer.plan.config import register_plan_configs, validate_plan
from trainer.plan.devices import check_names
from trainer.plan.planner import check_world, make_plan
from trainer.plan.report import format_plan

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
PREFIX = "plan."


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """(training overrides, plan overrides without their `plan.` prefix)."""
    train = [a for a in argv if not a.lstrip("+~").startswith(PREFIX)]
    plan = [a.replace(PREFIX, "", 1) for a in argv if a.lstrip("+~").startswith(PREFIX)]
    return train, plan


def compose_plan(argv: list[str]) -> tuple[Any, Any]:
    """The training config and the plan's options, in an initialised Hydra context (conf/), checked as
    trainer.train checks its config for this world size."""
    register_configs()
    register_plan_configs()
    train, plan_args = split_overrides(argv)
    cfg = compose("config", overrides=train)
    plan = compose("plan", overrides=plan_args)
    validate_plan(plan)
    check_names(plan)
    check_world(cfg, plan)
    validate_config(cfg, world_size=int(plan.gpus_per_node) * int(plan.nodes))
    return cfg, plan


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg, plan = compose_plan(argv)
    result = make_plan(cfg, plan)
    print(format_plan(result, cfg))
    return 0 if result.job.fits else 1


if __name__ == "__main__":
    sys.exit(run(main))
