"""Run `python -m trainer.train` jobs (or another trainer command's, or a script's) as forks of a server
process that has already imported the trainer.

Each launch under torchrun spends most of its time importing torch, transformers, DeepSpeed and Hydra in every
rank (~10 s per launch on 2 cores). The server imports them once; for each job it forks one child per rank,
sets the environment a launcher sets (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, as the deepspeed
launcher and srun do) and runs `trainer.train` as `__main__`. The ranks are real, separate processes that meet
over gloo exactly as under torchrun; only the launcher is cut out. Tests of torchrun itself (restarts, its
environment) still launch torchrun.

Protocol: one JSON line per job on the server's stdin, one JSON line back with the return code per rank.
Nothing may run a torch op in the server before forking: OpenMP thread pools do not survive a fork.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

SERVER_CODE = r"""
import json, os, signal, sys, time
replies = os.fdopen(os.dup(1), "w")  # the protocol's channel; anything the imports print goes to stderr
os.dup2(2, 1)
import datasets, hydra, transformers  # the imports every job would repeat (trainer.train itself runs as __main__)
import trainer.loop, trainer.strategies, trainer.rundir
from trainer.pipeline import exit_code_of, run_as_main
try:
    import deepspeed  # noqa: F401
    # ZeRO's optimizer check imports DeepSpeed's Muon, whose torch.compile decorators import dynamo and inductor:
    # ~2 s in every rank of every ZeRO job, unless done here
    import deepspeed.runtime.zero.muon.muon_optimizer  # noqa: F401
except ImportError:
    pass
sys.stdout.flush()

def run_rank(job, rank):
    os.setsid()  # its own process group: a hung rank and whatever it spawned are killed together
    fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1); os.dup2(fd, 2)
    devnull = os.open(os.devnull, os.O_RDONLY); os.dup2(devnull, 0)
    os.chdir(job["cwd"])
    os.environ.clear(); os.environ.update(job["env"])
    nproc = job["nproc"]
    if nproc > 1:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(job["port"]))
    if job.get("script"):
        os._exit(run_script(job["script"], job["args"]))
    os._exit(run_as_main(job["module"], job["args"]))  # what trainer.pipeline's fork launcher does

def run_script(path, args):  # `python PATH ARGS` in this forked process, as run_as_main does `python -m`
    import runpy
    sys.argv = [path, *args]
    sys.path[0] = os.path.dirname(path)  # the server's own first entry is "" (it runs as `python -c`)
    return exit_code_of(lambda: runpy.run_path(path, run_name="__main__"))  # the script is __main__ meanwhile

for line in sys.stdin:
    job = json.loads(line)
    pids = []
    for rank in range(job["nproc"]):
        sys.stdout.flush(); sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            run_rank(job, rank)
        pids.append(pid)
    codes, deadline = {}, time.monotonic() + job["timeout"]
    def kill_running():
        for pid in pids:
            if pid not in codes:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    while len(codes) < len(pids):
        for pid in pids:
            if pid in codes:
                continue
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                codes[pid] = os.waitstatus_to_exitcode(status)
                if codes[pid] != 0:  # like torchrun: one rank failing ends the others
                    kill_running()
        if len(codes) < len(pids) and time.monotonic() > deadline:
            kill_running()
            job["timed_out"] = True
        time.sleep(0.05)
    replies.write(json.dumps({"codes": [codes[p] for p in pids], "timed_out": job.get("timed_out", False)}) + "\n")
    replies.flush()
"""


class PreloadedServer:
    """One server per test session; `run` is safe to call from one thread at a time."""

    def __init__(self, *, root: Path, env: dict[str, str]) -> None:
        self.root, self.env = root, env
        self.proc: subprocess.Popen | None = None
        self.lock = threading.Lock()

    def _start(self) -> subprocess.Popen:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", SERVER_CODE],
                cwd=self.root,
                env=self.env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
        return self.proc

    def run(
        self,
        args: list[str],
        *,
        nproc: int,
        port: int,
        log: Path,
        env: dict[str, str],
        timeout: float,
        module: str = "trainer.train",
        script: str | None = None,
    ) -> subprocess.CompletedProcess:
        """`python -m module args` in `nproc` ranks, or with `script` (a path), `python script args`."""
        with self.lock:
            proc = self._start()
            log.write_text("")
            job = {
                "module": module,
                "script": script,
                "args": args,
                "nproc": nproc,
                "port": port,
                "log": str(log),
                "cwd": str(self.root),
                "env": env,
            }
            proc.stdin.write(json.dumps(job | {"timeout": timeout}) + "\n")
            proc.stdin.flush()
            reply = proc.stdout.readline()
        if not reply:
            raise RuntimeError(f"the preloaded launcher died; job log:\n{log.read_text()[-5000:]}")
        result = json.loads(reply)
        if result["timed_out"]:
            raise subprocess.TimeoutExpired(args, timeout, output=log.read_text()[-5000:])
        codes = result["codes"]
        returncode = next((c for c in codes if c != 0), 0)
        output = log.read_text()
        # The ranks' stdout and stderr share one log (as a terminal shows them): it is given as both.
        done = subprocess.CompletedProcess(args, returncode, stdout=output, stderr=output)
        done.rank_codes = codes  # -9: killed after another rank failed (as torchrun does)
        return done

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


def preload_enabled() -> bool:
    """TRAINER_TEST_LAUNCHER=torchrun runs every multi-rank test under torchrun instead (slower, same checks)."""
    return os.environ.get("TRAINER_TEST_LAUNCHER", "preloaded") == "preloaded" and hasattr(os, "fork")
