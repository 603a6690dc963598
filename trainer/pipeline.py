"""Run a chain of stages: `python -m trainer.pipeline chain=NAME [run_dir=DIR] [only=[STAGE,...]] [dry_run=true]`.

A chain (conf/chain/NAME.yaml) is an ordered list of stages. Each stage is one ordinary command with its
Hydra overrides (`trainer.train`, `trainer.quantize`, `trainer.export`, `trainer.evaluate` or
`trainer.report`), so any stage can be run alone: the pipeline prints the exact command line before running
it. Stages read each other's outputs through `${run_dir}`:

- a `trainer.train` stage runs in RUN_DIR/STAGE (`hydra.run.dir`) with `resume=auto`, so an interrupted
  stage continues from its last checkpoint when the chain is run again;
- a finished stage leaves RUN_DIR/STAGE/stage.json (its command and time); running the chain again skips
  it, and refuses to go on if the chain now gives that stage a different command (delete its directory to
  run it again);
- each stage's output is shown and also written to RUN_DIR/STAGE/stage.log.

Launchers: `fork` (default) runs each stage in a child forked from this process after the heavy imports
(torch, transformers, Hydra), which saves their ~10 s per stage, on machines without a GPU (a forked child
cannot use CUDA once the parent has touched it, and imports may: where a GPU is visible, `fork` runs the
stages as subprocesses); `subprocess` starts `python -m MODULE`; `torchrun` runs the `trainer.train` stages
on `nproc_per_node` ranks (and the others as subprocesses).
"""

from __future__ import annotations

import json
import logging
import os
import runpy
import shlex
import signal
import subprocess
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from trainer.cli import EXIT_INTERRUPTED, EXIT_USAGE, report_error
from trainer.errors import ConfigError
from trainer.pipeline_config import register_pipeline_configs
from trainer.utils import check_output_dir, register_package_resolver, write_json_atomic

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
MARKER = "stage.json"


def compose_pipeline(overrides: list[str]) -> Any:
    """The pipeline config, composed and checked; Hydra is left uninitialised so that stages can use it."""
    from hydra import compose, initialize_config_dir

    register_pipeline_configs()  # its own schemas only: the stages register theirs
    register_package_resolver()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose("pipeline", overrides=overrides)
    check_pipeline_config(cfg)
    return cfg


def check_pipeline_config(cfg: Any) -> None:
    """The values types cannot check (the launcher and each stage's module are closed choices: Hydra has)."""
    if cfg.nproc_per_node < 1:
        raise ConfigError(f"nproc_per_node={cfg.nproc_per_node}: must be >= 1")
    check_output_dir("run_dir", cfg.run_dir)
    stages = cfg.chain.stages
    if not stages:
        raise ConfigError(f"chain={cfg.chain.name} has no stages")
    unknown = [s for s in cfg.only or [] if s not in stages]
    if unknown:
        raise ConfigError(
            f"only={list(cfg.only)}: no stage named {unknown}; the stages are {', '.join(stages)}"
        )


def stage_args(cfg: Any, name: str, stage: Any) -> list[str]:
    """The stage's overrides, resolved, plus the run directory and resume of a training stage and
    `evaluate_args` of an evaluation stage."""
    args = [str(a) for a in stage.args]
    if stage.module == "trainer.train":
        args += [*cfg.train_args, f"hydra.run.dir={Path(cfg.run_dir) / name}", "resume=auto"]
    if stage.module == "trainer.evaluate":
        args += list(cfg.evaluate_args)
    return args


def stage_command(cfg: Any, stage: Any, args: list[str]) -> list[str]:
    """The command line that runs the stage alone (what `subprocess` and `torchrun` execute)."""
    if cfg.launcher == "torchrun" and stage.module == "trainer.train":
        return [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={cfg.nproc_per_node}", "-m", stage.module, *args,
        ]  # fmt: skip
    return [sys.executable, "-m", stage.module, *args]


def preload() -> None:
    """Import once what every stage imports, before any fork (no torch op may run here: OpenMP pools do not
    survive a fork)."""
    import datasets  # noqa: F401
    import transformers  # noqa: F401

    import trainer.evaluate  # noqa: F401
    import trainer.export  # noqa: F401
    import trainer.loop  # noqa: F401
    import trainer.quantize  # noqa: F401
    import trainer.report  # noqa: F401


def _tee(fd: int, log_path: Path) -> None:
    """Copy everything read from `fd` to our stdout and to the stage log, until the writer closes it. A Ctrl-C
    reaches the stage too, which stops as it does alone (a training stage checkpoints first): the copy goes on
    until the stage is done, then the Ctrl-C is raised here; a second one is raised at once. The first one
    only sets a flag (a KeyboardInterrupt raised between two reads, not in one, would leave the loop and close
    the stage's output under it); where SIGINT is ignored (nohup) it stays ignored."""
    interrupted = False

    def on_ctrl_c(signum: int, frame: Any) -> None:
        nonlocal interrupted
        if interrupted:
            raise KeyboardInterrupt
        interrupted = True

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main_thread else signal.SIG_IGN
    previous = signal.default_int_handler if previous is None else previous  # None: set outside Python
    if previous is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        with open(log_path, "ab") as log:
            while chunk := os.read(fd, 65536):  # resumed after the flag-setting handler (PEP 475)
                log.write(chunk)
                log.flush()
                os.write(sys.stdout.fileno(), chunk)
    finally:
        if previous is not signal.SIG_IGN:
            signal.signal(signal.SIGINT, previous)
    if interrupted:
        raise KeyboardInterrupt


def run_as_main(module: str, args: list[str]) -> int:
    """Run `python -m module args` in this (forked) process and return its exit code; the caller then
    leaves with os._exit, so nothing inherited from the parent runs at exit."""
    sys.argv = [module, *args]
    # runpy warns that preload() imported the module it now runs as __main__: intended, the code runs afresh
    warnings.filterwarnings("ignore", message=".*found in sys.modules.*", category=RuntimeWarning)
    return exit_code_of(lambda: runpy.run_module(module, run_name="__main__", alter_sys=True))


def exit_code_of(run: Callable[[], Any]) -> int:
    """`run()`'s exit code as a process running it as __main__ would end: SystemExit's code, 1 (with the
    traceback printed) for any other error, 0 otherwise; logs and streams flushed."""
    code = 0
    try:
        run()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def run_forked(module: str, args: list[str], log_path: Path) -> int:
    """Run `python -m module args` in a forked child; its output is teed to the log. Returns its exit code."""
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: become `python -m module args`
        os.close(read_fd)
        os.dup2(write_fd, 1)
        os.dup2(write_fd, 2)
        os.close(write_fd)
        os._exit(run_as_main(module, args))
    os.close(write_fd)
    try:
        _tee(read_fd, log_path)
    finally:  # after a Ctrl-C too: the stage has closed its output, so it is gone or going
        os.close(read_fd)
        _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def run_process(command: list[str], log_path: Path) -> int:
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        _tee(proc.stdout.fileno(), log_path)
    return proc.returncode


def finished(stage_dir: Path, command: str) -> bool:
    """Whether the stage already ran to the end with this command; a different command is an error."""
    marker = stage_dir / MARKER
    if not marker.is_file():
        return False
    record = json.loads(marker.read_text())
    if record.get("command") != command:
        raise ConfigError(
            f"{stage_dir} finished with a different command:\n  was: {record.get('command')}\n  now: {command}\n"
            f"delete {stage_dir} to run the stage again with the new one (and the stages that use its output)"
        )
    return True


def effective_launcher(requested: str) -> str:
    """`fork` becomes `subprocess` where a GPU is visible: CUDA does not survive a fork once initialised,
    and the parent's imports may initialise it. Counting the GPUs goes through NVML, which does not."""
    import torch

    if requested == "fork" and torch.cuda.device_count() > 0:
        return "subprocess"
    return requested


def run_pipeline(cfg: Any) -> dict[str, Any]:
    """Run the stages in order, skipping finished ones; stops at the first failing stage."""
    run_dir = Path(cfg.run_dir)
    stages = cfg.chain.stages
    recipes = cfg.chain.recipes
    selected = [n for n in stages if not cfg.only or n in cfg.only]
    other_recipes = [
        n for n in selected if stages[n].recipes is not None and recipes not in stages[n].recipes
    ]
    selected = [n for n in selected if n not in other_recipes]
    launcher = effective_launcher(cfg.launcher)
    print(
        f"pipeline {cfg.chain.name}: {len(selected)} stage(s) in {run_dir}"
        + (" (dry run)" if cfg.dry_run else "")
        + (
            f", launcher {launcher} (a GPU is visible: CUDA does not survive a fork)"
            if launcher != cfg.launcher
            else ""
        )
    )
    if other_recipes:
        print(f"  not for the {recipes} recipes, left out: {', '.join(other_recipes)}")
    summary: dict[str, Any] = {}
    start = time.perf_counter()
    for i, name in enumerate(selected, 1):
        stage = stages[name]
        args = stage_args(cfg, name, stage)
        command = shlex.join(["python", "-m", stage.module, *args])
        stage_dir = run_dir / name
        head = f"[{i}/{len(selected)}] {name}" + (f": {stage.about}" if stage.about else "")
        if finished(stage_dir, command):
            print(f"{head}\n  done before, skipped ({stage_dir / MARKER})", flush=True)
            summary[name] = {"status": "skipped"}
            continue
        print(f"{head}\n  $ {command}", flush=True)
        if cfg.dry_run:
            summary[name] = {"status": "dry_run"}
            continue
        stage_dir.mkdir(parents=True, exist_ok=True)
        log_path = stage_dir / "stage.log"
        t0 = time.perf_counter()
        if launcher == "fork":
            preload()  # once (later calls find the modules imported), and only if a stage runs
            code = run_forked(stage.module, args, log_path)
        else:
            code = run_process(stage_command(cfg, stage, args), log_path)
        seconds = time.perf_counter() - t0
        if code != 0:
            summary[name] = {"status": "failed", "code": code, "seconds": seconds}
            print(
                f"stage {name} failed (exit code {code}) after {seconds:.0f}s; its log: {log_path}. "
                "Fix the cause and run the same command again: finished stages are skipped, training resumes.",
                flush=True,
            )
            break
        record = {
            "command": command,
            "seconds": seconds,
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        write_json_atomic(stage_dir / MARKER, record)  # never half a marker: finished() reads it
        summary[name] = {"status": "done", "seconds": seconds}
        print(f"  {name} done in {seconds:.0f}s", flush=True)
    total = time.perf_counter() - start
    if not cfg.dry_run:
        write_json_atomic(
            run_dir / "pipeline.json", {"chain": cfg.chain.name, "seconds": total, "stages": summary}
        )
    failed = [s for s in summary.values() if s["status"] == "failed"]
    print(f"pipeline {cfg.chain.name}: {'failed' if failed else 'finished'} in {total / 60:.1f} min")
    if not failed:
        for path in cfg.chain.outputs:
            print(f"  {path}" + ("" if cfg.dry_run or Path(path).exists() else " (missing)"))
    return {
        "failed": bool(failed),
        "code": failed[0]["code"] if failed else 0,
        "stages": summary,
        "seconds": total,
    }


def main(argv: list[str] | None = None) -> int:
    """The exit status: 0, 2 for an error the message explains (ours or a stage's, printed as every command
    prints it: trainer/cli.py), 1 for a stage that failed otherwise."""
    overrides = sys.argv[1:] if argv is None else argv
    try:
        cfg = compose_pipeline(overrides)
        OmegaConf.resolve(cfg)
        result = run_pipeline(cfg)
    except KeyboardInterrupt:
        print(
            "interrupted (Ctrl-C): the running stage stopped as it does alone (a training stage wrote a checkpoint "
            "first); the same command continues: finished stages are skipped and an interrupted training stage "
            "resumes from its checkpoint (resume=auto)",
            file=sys.stderr,
            flush=True,
        )
        return EXIT_INTERRUPTED
    except Exception as err:
        code = report_error(err)
        if code is None:
            raise
        return code
    if not result["failed"]:
        return 0
    return EXIT_USAGE if result["code"] == EXIT_USAGE else 1


if __name__ == "__main__":
    sys.exit(main())
