"""Entry point: `python -m trainer.train [hydra overrides]` (also under torchrun)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import datasets
import hydra
import transformers
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from trainer.checkpoint import refuse_unasked_overwrite
from trainer.cli import EXIT_INTERRUPTED, run
from trainer.config import register_configs
from trainer.distributed import destroy, read_env
from trainer.errors import Interrupted
from trainer.loop import Trainer
from trainer.preemption import EXIT_PREEMPTED, Preempted
from trainer.rundir import register_resolver, write_hydra_record

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
register_configs()
register_resolver()  # hydra.run.dir: one directory per job (trainer/rundir.py)


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    datasets.disable_progress_bars()  # our own bar is the one that matters
    transformers.utils.logging.disable_progress_bar()
    env = read_env()
    # A run directory that holds checkpoints, with no resume given, is refused (the Trainer checks it too)
    # before Hydra's record of this job is written: the record of the run that wrote them stays.
    if cfg.resume is None:
        refuse_unasked_overwrite(run_dir / "checkpoints")
    if env.is_main:
        write_hydra_record(cfg, run_dir)
    try:
        Trainer(cfg, run_dir=run_dir, env=env).train()
    except Preempted as stop:
        if stop.signum == signal.SIGINT:  # Ctrl-C: checkpoint written, the loop said how to continue
            sys.exit(EXIT_INTERRUPTED)
        # Checkpoint and marker written; the batch script requeues and resume=auto continues. Under torchrun
        # exit 0: a failure code would make its agent restart the ranks (--max-restarts) instead of stopping.
        sys.exit(0 if "TORCHELASTIC_RUN_ID" in os.environ else EXIT_PREEMPTED)
    except KeyboardInterrupt:  # a Ctrl-C before the first step, or a second one
        latest = run_dir / "checkpoints" / "latest"
        kept = (
            f"the same command with resume=auto continues from the last checkpoint, {latest.read_text().strip()}"
            if latest.is_file()
            else "no checkpoint was written"
        )
        raise Interrupted(f"interrupted (Ctrl-C), stopped at once: {kept} (run dir {run_dir})") from None
    finally:
        destroy()


def _drop_launcher_args() -> None:
    """The deepspeed launcher appends --local_rank=N; the rank comes from the environment, and Hydra would refuse it."""
    argv, skip = [sys.argv[0]], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg in ("--local_rank", "--local-rank"):
            skip = True
        elif not arg.startswith(("--local_rank=", "--local-rank=")):
            argv.append(arg)
    sys.argv = argv


def _quiet_secondary_ranks() -> None:
    """Only rank 0 writes into the run directory (the Trainer writes .hydra/ there): other ranks skip Hydra's
    job log."""
    if int(read_env().rank) != 0:
        sys.argv += ["hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]


def _main() -> None:
    _drop_launcher_args()
    _quiet_secondary_ranks()
    main()


if __name__ == "__main__":
    run(_main)  # an error that is ours to explain: one paragraph, exit status 2 (trainer/cli.py)
