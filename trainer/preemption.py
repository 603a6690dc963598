"""Preemption: SIGUSR1 or SIGTERM asks the run to checkpoint at the next step boundary and exit for a requeue;
Ctrl-C (SIGINT) does the same and exits 130, without asking for a requeue.

Slurm sends the warning signal (`--signal=USR1@SECONDS`) to every process of the job, some clusters send only
SIGTERM, and submitit's jobs (hydra/launcher=slurm) get SIGUSR2. The handler only sets a flag: the loop checks
it between optimizer steps, and all ranks agree through one all-reduce, so no rank leaves a collective that the
others are still in. A second Ctrl-C stops at once (KeyboardInterrupt), as a person pressing it again means.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import torch

from trainer.distributed import all_reduce_sum

SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
# A terminal sends Ctrl-C to the whole foreground process group, and torchrun's agent, which got it too, sends
# it on to its workers: a SIGINT this soon after the first is that copy, not a person's second Ctrl-C.
SECOND_INTERRUPT_AFTER_S = 1.0
# EX_TEMPFAIL from sysexits.h: "a temporary failure, try again later".
EXIT_PREEMPTED = 75
# Rank 0 writes it after the preemption checkpoint; launch/slurm/train.sbatch requeues the job when it exists.
MARKER = "preempted.json"


class Preempted(Exception):  # noqa: N818 - an event, not a failure
    """Raised out of the loop after the preemption checkpoint is written."""

    def __init__(self, *, step: int, signum: int) -> None:
        super().__init__(f"preempted by {signal.Signals(signum).name} at step {step}: checkpoint written")
        self.step, self.signum = step, signum


def watched_signals(environ: Mapping[str, str] | None = None) -> tuple[signal.Signals, ...]:
    """SIGUSR1 and SIGTERM, plus submitit's own warning signal (USR2 unless set) in a submitit Slurm job."""
    env = os.environ if environ is None else environ
    if env.get("SUBMITIT_EXECUTOR") != "slurm":
        return SIGNALS
    extra = signal.Signals["SIG" + env.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")]
    return SIGNALS if extra in SIGNALS else (*SIGNALS, extra)


class PreemptionWatch:
    """Installs the signal handlers for the life of a run; `requested()` is the agreed decision of all ranks."""

    def __init__(self, *, signals: tuple[signal.Signals, ...] | None = None) -> None:
        self.signum: int | None = None
        self._interrupted_at: float | None = None  # when the first Ctrl-C came
        self._previous: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
            for s in signals or (*watched_signals(), signal.SIGINT):
                self._previous[s] = signal.signal(s, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        if signum == signal.SIGINT:
            now = time.monotonic()
            if self._interrupted_at is None:
                self._interrupted_at = now
            elif now - self._interrupted_at >= SECOND_INTERRUPT_AFTER_S:
                raise KeyboardInterrupt  # a second Ctrl-C: stop at once, as Python's own handler does
            else:
                return  # the launcher's copy of the first one
        self.signum = self.signum or signum  # nothing else: we may be inside a collective or a kernel launch

    def requested(self, device: torch.device) -> int | None:
        """The signal number if any rank got one, else None; every rank gets the same kind of answer: a
        scheduler's signal on any rank makes it a preemption (to be requeued), else a Ctrl-C on any rank an
        interrupt."""
        preempting = self.signum is not None and self.signum != signal.SIGINT
        flags = torch.tensor([preempting, self.signum == signal.SIGINT], dtype=torch.long, device=device)
        num_preempting, num_interrupted = all_reduce_sum(flags).tolist()
        if num_preempting:
            return self.signum if preempting else int(SIGNALS[0])  # a rank that got none follows the others
        return int(signal.SIGINT) if num_interrupted else None

    def hand_over(self, signum: int) -> None:
        """Restore the previous handlers, then give the signal to the one that was there, if it was a function.

        Under submitit (hydra/launcher=slurm) that handler requeues the job; it runs after our checkpoint.
        """
        previous = self._previous.get(signum)
        self.close()
        # Not for a Ctrl-C: the handler before ours (Python's, a notebook's) would only raise KeyboardInterrupt.
        if callable(previous) and signum != signal.SIGINT:
            previous(signum, None)

    def close(self) -> None:
        """Put the previous handlers back (runs in one process one after another, as in tests)."""
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()


def write_marker(run_dir: Path, *, step: int, signum: int, checkpoint: Path) -> None:
    payload = {"step": step, "signal": signal.Signals(signum).name, "checkpoint": str(checkpoint)}
    (run_dir / MARKER).write_text(json.dumps(payload) + "\n")


def clear_marker(run_dir: Path) -> None:
    (run_dir / MARKER).unlink(missing_ok=True)
