"""A throw-away Slurm cluster on this machine for the launch tests: munged, slurmctld and two slurmd nodes.

Debian 12's slurm-wlm 22.05 runs with SlurmUser=root, no accounting, proctrack/linuxproc and task/none, the
CPU line from `slurmd -C`. The two slurmd daemons act as two nodes named 127.0.0.2 and 127.0.0.3, each on
its own port (`slurmd -N`). Everything (config, state, sockets, logs) lives in one directory.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

NODES = ("127.0.0.2", "127.0.0.3")
PACKAGES = ("slurm-wlm", "munge")


def install_reason() -> str | None:
    """None when slurmctld, slurmd and munged are (or could be made) available, else why not."""
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "munged", "sbatch")):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "Slurm is not installed and cannot be: installing slurm-wlm and munge needs root and apt-get"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            return f"`{' '.join(cmd)}` failed: {proc.stderr.strip()[-500:]}"
    return None


def _free_ports(n: int) -> list[int]:
    import socket

    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class SlurmCluster:
    """Start with `start()`, submit with `run(["sbatch", ...])`, and always `stop()`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self._procs: list[subprocess.Popen] = []

    def _write_config(self) -> None:
        r = self.root
        (r / "state").mkdir(parents=True, exist_ok=True)
        for node in NODES:
            (r / f"spool-{node}").mkdir(exist_ok=True)
        hardware = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
        line = hardware.splitlines()[0]
        resources = " ".join(f for f in line.split() if not f.startswith("NodeName="))
        ctld_port, *node_ports = _free_ports(1 + len(NODES))
        nodes = "\n".join(
            f"NodeName={n} NodeAddr={n} NodeHostname={n} Port={p} {resources} State=UNKNOWN"
            for n, p in zip(NODES, node_ports, strict=True)
        )
        self.conf.write_text(
            f"""ClusterName=trainer-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={r}/munge.socket
CredType=cred/munge
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool-%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
SlurmdTimeout=30
KillWait=30
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""
        )

    def start(self) -> None:
        r = self.root
        r.mkdir(parents=True, exist_ok=True)
        self._write_config()
        key = r / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        subprocess.run(
            [
                "munged",
                "--force",
                f"--key-file={key}",
                f"--socket={r}/munge.socket",
                f"--pid-file={r}/munged.pid",
                f"--log-file={r}/munged.log",
                f"--seed-file={r}/munged.seed",
            ],
            check=True,
            capture_output=True,
        )
        subprocess.run(["slurmctld", "-i"], env=self.env, check=True, capture_output=True)
        for node in NODES:
            subprocess.run(["slurmd", "-N", node], env=self.env, check=True, capture_output=True)
        self.wait_for(lambda: self.idle_nodes() == len(NODES), timeout=30, what="both nodes idle")

    def run(
        self, args: list[str], *, check: bool = True, timeout: float = 60, cwd: Path | None = None
    ) -> str:
        proc = subprocess.run(args, env=self.env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
        return proc.stdout

    def idle_nodes(self) -> int:
        out = self.run(["sinfo", "-h", "-N", "-o", "%T"], check=False)
        return sum(1 for s in out.split() if s.startswith("idle"))

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as key -> value (empty once Slurm has forgotten the job)."""
        out = self.run(["scontrol", "-o", "show", "job", job_id], check=False)
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_for(self, ready, *, timeout: float, what: str, poll: float = 0.5) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline:
                raise TimeoutError(f"Slurm: no {what} after {timeout:.0f}s; see the logs in {self.root}")
            time.sleep(poll)

    def queue_empty(self) -> bool:
        return self.run(["squeue", "-h"], check=False).strip() == ""

    def stop(self) -> None:
        """Cancel every job and wait for the queue to drain first: stopping slurmd under a step orphans it."""
        try:
            self.run(["scancel", "--full", "--user", "root"], check=False)
            self.wait_for(self.queue_empty, timeout=60, what="empty queue")
        finally:
            self.run(["scontrol", "shutdown"], check=False)  # slurmctld and the slurmd daemons
            for pid_file in sorted(self.root.glob("slurm*.pid")):
                _wait_gone(pid_file, timeout=15)
            _wait_gone(self.root / "munged.pid", timeout=15, terminate=True)  # last: Slurm needs it to stop


def _wait_gone(pid_file: Path, *, timeout: float, terminate: bool = False) -> None:
    """Wait for the daemon of pid_file to exit (SIGTERM it first if `terminate`); then SIGTERM, SIGKILL."""
    import signal

    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    for sig in ((signal.SIGTERM,) if terminate else (None, signal.SIGTERM)) + (signal.SIGKILL,):
        if sig is not None:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)
