"""Launching at scale: Slurm with preemption and two nodes, torchrun.sh over loopback, the submitit sweep,
experiment logging (wandb offline, TensorBoard), the run directory per job, and the Dockerfile.

The Slurm tests install Debian's slurm-wlm and munge when missing and run one real cluster for the module
(tests/slurm_cluster.py): slurmctld and two slurmd nodes, 127.0.0.2 and 127.0.0.3, on this machine.
"""

from __future__ import annotations

import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import (
    PYTHON,
    ROOT,
    TINY,
    compose_config,
    composition_error,
    free_port,
    make_trainer,
    read_metrics,
    run_with_ctrl_c,
    subprocess_env,
    train_losses,
)
from tests.slurm_cluster import SlurmCluster, install_reason
from trainer.distributed import read_env
from trainer.errors import LaunchError, MissingPackageError
from trainer.preemption import MARKER, Preempted, watched_signals
from trainer.rundir import job_run_dir

# Long enough for the preemption signal to land mid-run (a step takes ~20-40 ms with two CPU ranks).
SLURM_STEPS = 100
DDP = [*TINY, "strategy=ddp", "train.log_every=1", "train.export_hf=false", "scheduler=constant"]
BIN = Path(PYTHON).parent


# ---- Slurm ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = install_reason()
    if reason is not None:
        pytest.skip(reason)
    c = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    env = subprocess_env()
    c.env.update(PYTHONPATH=env["PYTHONPATH"], OMP_NUM_THREADS="1", PYTHON=PYTHON)
    c.start()
    yield c
    c.stop()


def sbatch(cluster: SlurmCluster, out: Path, *options: str, overrides: list[str]) -> str:
    """Submit launch/slurm/train.sbatch from the repository root; returns the job id."""
    args = ["sbatch", "--parsable", f"--output={out}/%x-%j.out", *options, "launch/slurm/train.sbatch"]
    return cluster.run([*args, *overrides], timeout=30, cwd=ROOT).strip().split(";")[0]


def wait_finished(cluster: SlurmCluster, job_id: str, *, timeout: float) -> str:
    done = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
    cluster.wait_for(
        lambda: cluster.job(job_id).get("JobState") in done, timeout=timeout, what=f"end of {job_id}"
    )
    return cluster.job(job_id)["JobState"]


def job_log(out: Path, job_id: str) -> str:
    return (out / f"train-{job_id}.out").read_text()


@pytest.fixture(scope="module")
def two_node_job(cluster, tmp_path_factory):
    """`sbatch -N 2` with one rank per node: also the uninterrupted reference of the preemption test."""
    out = tmp_path_factory.mktemp("two_nodes")
    overrides = [*DDP, f"train.max_steps={SLURM_STEPS}", f"hydra.run.dir={out / 'run'}"]
    job_id = sbatch(cluster, out, "-N", "2", "--export=ALL,NPROC_PER_NODE=1", overrides=overrides)
    state = wait_finished(cluster, job_id, timeout=300)
    return job_id, state, out


def test_sbatch_on_two_nodes_runs_one_torchrun_per_node_into_one_run_dir(cluster, two_node_job):
    job_id, state, out = two_node_job
    log = job_log(out, job_id)
    assert state == "COMPLETED", log[-5000:]
    assert "on 127.0.0.[2-3]" in log and "rendezvous 127.0.0.2:" in log  # the first node hosts it
    assert "2 rank(s)" in log
    for node in (
        "127.0.0.2",
        "127.0.0.3",
    ):  # each slurmd launched one task of the step: one torchrun per node
        slurmd_log = (cluster.root / f"slurmd-{node}.log").read_text()
        assert slurmd_log.count(f"launch task StepId={job_id}.0 ") == 1, node
    assert sorted(p.name for p in out.iterdir()) == ["run", f"train-{job_id}.out"]  # one run dir, no other
    assert sorted(train_losses(out / "run")) == list(range(1, SLURM_STEPS + 1))
    assert len(read_metrics(out / "run")[0]["peak_mem_bytes_per_rank"]) == 2


def test_preempted_slurm_job_requeues_resumes_and_ends_with_the_uninterrupted_loss(
    cluster, two_node_job, tmp_path
):
    run_dir = tmp_path / "run"
    overrides = [*DDP, f"train.max_steps={SLURM_STEPS}", f"hydra.run.dir={run_dir}"]
    job_id = sbatch(cluster, tmp_path, "-N", "1", "--export=ALL,NPROC_PER_NODE=2", overrides=overrides)
    metrics = run_dir / "metrics.jsonl"
    cluster.wait_for(lambda: metrics.is_file() and metrics.stat().st_size > 0, timeout=180, what="first step")
    cluster.run(["scancel", "--signal=USR1", job_id])  # what --signal=USR1@120 sends before the time limit

    # The ranks checkpoint, the batch script sees the marker and requeues: the job is pending again.
    def requeued() -> bool:
        job = cluster.job(job_id)
        return job.get("Restarts") == "1" and job.get("JobState") == "PENDING"

    cluster.wait_for(requeued, timeout=120, what="requeue")
    marker = json.loads((run_dir / MARKER).read_text())
    assert marker["signal"] == "SIGUSR1" and 0 < marker["step"] < SLURM_STEPS
    # Skip the ~120 s hold of a requeued job, but only once the node has cleaned up the old run and a second
    # has passed: slurmd refuses a credential issued no later than (same second as) the one it revoked.
    cluster.wait_for(lambda: cluster.idle_nodes() == 2, timeout=60, what="node cleaned up")
    time.sleep(1.5)
    cluster.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"])
    state = wait_finished(cluster, job_id, timeout=300)
    log = job_log(tmp_path, job_id)
    assert state == "COMPLETED", log[-5000:]
    step = marker["step"]
    assert f"requeueing job {job_id}" in log and f"resumed from {run_dir}/checkpoints/step_{step:08d}" in log
    assert not (run_dir / MARKER).exists()  # the requeued job cleared it and finished

    want = train_losses(two_node_job[2] / "run")
    got = train_losses(run_dir)
    assert sorted(got) == list(range(1, SLURM_STEPS + 1))
    for s in range(step + 1, SLURM_STEPS + 1):  # every step after the resume, the last included
        assert got[s] == pytest.approx(want[s], rel=1e-5), (s, got[s], want[s])
    evals = [
        [r["eval_loss"] for r in read_metrics(d) if "eval_loss" in r]
        for d in (run_dir, two_node_job[2] / "run")
    ]
    assert evals[0][-1] == pytest.approx(evals[1][-1], rel=1e-5)


def test_submitit_sweep_submits_one_slurm_job_per_value(cluster, tmp_path):
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [
            PYTHON,
            "-m",
            "trainer.train",
            "-m",
            "hydra/launcher=slurm",
            "optimizer=adamw,lion",
            *TINY,
            "train.max_steps=2",
            "train.export_hf=false",
            f"hydra.sweep.dir={sweep}",
            "hydra.launcher.timeout_min=10",
        ],
        cwd=ROOT,
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    for num, target in ((0, "torch.optim.AdamW"), (1, "trainer.optimizers.Lion")):
        assert (sweep / str(num) / "metrics.jsonl").is_file()
        assert f"_target_: {target}" in (sweep / str(num) / ".hydra" / "config.yaml").read_text()
    tasks = sorted(p.name for p in (sweep / ".submitit").iterdir() if re.fullmatch(r"\d+_\d+", p.name))
    assert len(tasks) == 2  # one Slurm job per value: the two tasks of an array job (JOBID_0, JOBID_1)

    # submitit returns once the results are written; Slurm may still be finishing the job (COMPLETING).
    def settled() -> bool:
        return all(cluster.job(t).get("JobState") not in ("PENDING", "RUNNING", "COMPLETING") for t in tasks)

    cluster.wait_for(settled, timeout=60, what=f"end of jobs {tasks}")
    assert all(cluster.job(t).get("JobState") == "COMPLETED" for t in tasks), [cluster.job(t) for t in tasks]


@pytest.mark.parametrize("launcher,target", [("slurm", "SlurmLauncher"), ("local", "LocalLauncher")])
def test_submitit_launcher_configs_compose(launcher, target):
    from hydra import compose, initialize_config_dir

    from trainer.train import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose("config", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_ == f"hydra_plugins.hydra_submitit_launcher.submitit_launcher.{target}"
    if launcher == "slurm":
        assert cfg.hydra.launcher.signal_delay_s == 120 and cfg.hydra.launcher.max_num_timeout == 3
        assert any("MASTER_ADDR" in line for line in cfg.hydra.launcher.setup)


# ---- torchrun.sh and the run directory -----------------------------------------------------------------


def test_two_torchrun_sh_nodes_rendezvous_over_loopback_and_train_together(tmp_path):
    overrides = [*DDP, "train.max_steps=6"]
    port = free_port()
    env = subprocess_env() | {"PYTHON": PYTHON}
    nodes = [
        subprocess.Popen(
            [
                str(ROOT / "launch" / "torchrun.sh"),
                *("--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(rank)),
                *("--head", f"127.0.0.1:{port}", "--run-id", "loopback"),
                *overrides,
            ],
            cwd=tmp_path,  # the run directory is relative: outputs/torchrun-loopback here
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (1, 0)  # the node that does not host the rendezvous may well start first
    ]
    logs = [p.communicate(timeout=300)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert [p.name for p in (tmp_path / "outputs").iterdir()] == ["torchrun-loopback"]
    run_dir = tmp_path / "outputs" / "torchrun-loopback"
    assert "2 rank(s)" in logs[0] + logs[1]  # c10d may give rank 0 to either node
    # Together they follow the single-process run of the same global batch.
    reference = make_trainer(tmp_path / "single", *[o for o in overrides if o != "strategy=ddp"])
    reference.train()
    want, got = train_losses(tmp_path / "single"), train_losses(run_dir)
    assert sorted(got) == sorted(want) == list(range(1, 7))
    assert all(got[s] == pytest.approx(want[s], rel=1e-4) for s in want)


def test_torchrun_sh_refuses_several_nodes_without_a_head_or_a_run_id():
    script = str(ROOT / "launch" / "torchrun.sh")
    for args, message in (
        (["--nnodes", "2"], "rendezvous address of node 0"),
        (["--nnodes", "2", "--head", "node0"], "same job id on every node"),
        (["--nnodes", "2", "--node-rank", "2", "--head", "n", "--run-id", "x"], "not below --nnodes"),
        (["--nproc-per-node", "two"], "whole number"),
        (["--max-restart", "1"], "unknown option --max-restart"),
    ):
        proc = subprocess.run(
            [script, *args], capture_output=True, text=True, env={"PATH": os.environ["PATH"]}
        )
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)


def test_run_dir_comes_from_the_job_identity_shared_by_every_rank():
    default = "outputs/DATE/TIME"
    assert job_run_dir(default, {}) == default  # a lone process
    assert job_run_dir(default, {"TRAINER_RUN_DIR": "/runs/a", "TORCHELASTIC_RUN_ID": "x"}) == "/runs/a"
    assert job_run_dir(default, {"TORCHELASTIC_RUN_ID": "exp1"}) == "outputs/torchrun-exp1"
    local = {"TORCHELASTIC_RUN_ID": "none", "LOCAL_WORLD_SIZE": "2", "WORLD_SIZE": "2"}
    assert job_run_dir(default, local) == job_run_dir(default, dict(local))  # the agent: same for its workers
    assert job_run_dir(default, local).endswith(f"-{os.getppid()}")
    from trainer.errors import ConfigError

    with pytest.raises(ConfigError, match="--rdzv-id"):
        job_run_dir(default, {"TORCHELASTIC_RUN_ID": "none", "LOCAL_WORLD_SIZE": "2", "WORLD_SIZE": "4"})
    srun = {"SLURM_JOB_ID": "42", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "8"}
    assert job_run_dir(default, srun) == "outputs/slurm-42.0"
    assert job_run_dir(default, {"SLURM_JOB_ID": "42"}) == default  # a shell inside an allocation


def test_srun_with_several_tasks_but_no_master_addr_is_an_error():
    srun = {"SLURM_PROCID": "1", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4", "SLURM_LOCALID": "1"}
    with pytest.raises(LaunchError, match="MASTER_ADDR is not set"):
        read_env(srun)
    assert read_env(srun | {"MASTER_ADDR": "node0"}).world_size == 4
    # The batch script of a 4-task allocation is one process, not a rank of a 4-task step.
    assert read_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "4"}).world_size == 1


# ---- preemption in one process -------------------------------------------------------------------------


def signal_after_step(trainer, step: int, signum: int):
    """Send `signum` to this process right after optimizer step `step` (as Slurm would, mid-run)."""
    train_step = trainer.train_step

    def step_then_signal():
        out = train_step()
        if trainer.step == step:
            os.kill(os.getpid(), signum)
        return out

    trainer.train_step = step_then_signal


def test_sigterm_checkpoints_at_the_step_boundary_and_resume_matches_the_uninterrupted_run(tmp_path):
    common = [*TINY, "train.log_every=1", "train.export_hf=false"]
    make_trainer(tmp_path / "straight", *common).train()
    handler = signal.getsignal(signal.SIGTERM)
    run_dir = tmp_path / "preempted"
    trainer = make_trainer(run_dir, *common)
    signal_after_step(trainer, 3, signal.SIGTERM)
    with pytest.raises(Preempted, match="SIGTERM at step 3"):
        trainer.train()
    assert signal.getsignal(signal.SIGTERM) is handler  # ours are gone once the run stops
    assert json.loads((run_dir / MARKER).read_text())["step"] == 3
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    assert max(train_losses(run_dir)) == 3

    make_trainer(run_dir, *common, "resume=auto").train()
    assert not (run_dir / MARKER).exists()
    want, got = train_losses(tmp_path / "straight"), train_losses(run_dir)
    assert sorted(got) == list(range(1, 7))
    assert all(got[s] == pytest.approx(want[s], rel=1e-6) for s in want)


CTRL_C_AFTER_STEP_3 = """
import trainer.loop
step = trainer.loop.Trainer.train_step
def step_then_ctrl_c(self):
    out = step(self)
    if self.step == 3:
        ctrl_c()
    return out
trainer.loop.Trainer.train_step = step_then_ctrl_c
"""


def test_ctrl_c_checkpoints_says_how_to_continue_exits_130_and_resume_matches_the_uninterrupted_run(tmp_path):
    common = [*TINY, "train.log_every=1", "train.export_hf=false", "train.progress_bar=false"]
    make_trainer(tmp_path / "straight", *common).train()
    run_dir = tmp_path / "run"
    proc = run_with_ctrl_c("trainer.train", [*common, f"hydra.run.dir={run_dir}"], hook=CTRL_C_AFTER_STEP_3)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 130, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    [line] = [line for line in output.splitlines() if line.startswith("interrupted")]
    assert "at step 3" in line and "resume=auto" in line and str(run_dir) in line, line
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    assert not (run_dir / MARKER).exists()  # a person stopped it: nothing asks a scheduler to requeue it
    assert max(train_losses(run_dir)) == 3

    make_trainer(run_dir, *common, "resume=auto").train()
    want, got = train_losses(tmp_path / "straight"), train_losses(run_dir)
    assert sorted(got) == list(range(1, 7))
    assert all(got[s] == pytest.approx(want[s], rel=1e-5) for s in want)


def test_a_second_ctrl_c_stops_at_once_without_a_checkpoint(tmp_path, monkeypatch):
    import trainer.preemption

    monkeypatch.setattr(trainer.preemption, "SECOND_INTERRUPT_AFTER_S", 0.0)
    trainer = make_trainer(tmp_path, *TINY, "train.export_hf=false")
    train_step = trainer.train_step

    def step_then_two_ctrl_c():
        out = train_step()
        if trainer.step == 2:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return out

    trainer.train_step = step_then_two_ctrl_c
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert signal.getsignal(signal.SIGINT) is handler
    assert trainer.step == 2 and not (tmp_path / "checkpoints" / "latest").exists()


def test_a_handler_installed_before_the_trainer_runs_after_the_checkpoint(tmp_path):
    """submitit's requeue handler (hydra/launcher=slurm) must see the checkpoint already written."""
    seen = []
    previous = signal.signal(
        signal.SIGUSR1, lambda s, f: seen.append((tmp_path / "checkpoints" / "latest").is_file())
    )
    try:
        trainer = make_trainer(tmp_path, *TINY, "train.export_hf=false")
        signal_after_step(trainer, 2, signal.SIGUSR1)
        with pytest.raises(Preempted):
            trainer.train()
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert seen == [True]
    assert signal.SIGUSR2 in watched_signals({"SUBMITIT_EXECUTOR": "slurm"})
    assert signal.SIGUSR2 not in watched_signals({})


# ---- experiment logging --------------------------------------------------------------------------------


def read_wandb_records(path: Path) -> list:
    """The records of a .wandb file: a 7-byte W&B header, then LevelDB's log format of 32 KiB blocks
    (7-byte record headers: crc32, length, type full/first/middle/last) holding serialized Record protos."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, _magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B"
    records, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            break
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def wandb_history(run_dir: Path) -> tuple[dict[int, dict[str, float]], list]:
    """Step -> logged values over every offline run part of the run directory, and the run records."""
    history, runs = {}, []
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        for record in read_wandb_records(path):
            if record.HasField("history"):
                items = {
                    (i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item
                }
                history.setdefault(int(items.pop("_step")), {}).update(
                    {k: v for k, v in items.items() if not k.startswith("_")}
                )
            elif record.HasField("run"):
                runs.append(record.run)
    return history, runs


def test_wandb_offline_and_tensorboard_log_the_metrics_and_a_resumed_run_continues_the_wandb_run(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    common = [*TINY, "logger=wandb", "logger.wandb.tags=[test]", "train.log_every=1", "train.export_hf=false"]
    make_trainer(tmp_path, *common, "train.max_steps=3").train()
    make_trainer(tmp_path, *common, "resume=auto").train()

    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    parts = sorted(p.name for p in (tmp_path / "wandb").glob("offline-run-*"))
    assert len(parts) == 2 and all(p.endswith(f"-{run_id}") for p in parts)  # one wandb run, in two parts

    jsonl = {r["step"]: r for r in read_metrics(tmp_path) if "loss" in r}
    evals = {r["step"]: r for r in read_metrics(tmp_path) if "eval_loss" in r}
    assert sorted(jsonl) == list(range(1, 7))
    history, runs = wandb_history(tmp_path)
    assert sorted(history) == list(range(1, 7))
    for step, record in jsonl.items():
        for key in ("loss", "lr", "grad_norm", "tokens", "mfu"):
            assert history[step][key] == pytest.approx(record[key]), (step, key)
    assert history[6]["eval_loss"] == pytest.approx(evals[6]["eval_loss"])
    assert [r.run_id for r in runs] == [run_id, run_id] and list(runs[-1].tags) == ["test"]
    config = {c.key: json.loads(c.value_json) for c in runs[-1].config.update}  # the resumed part's config
    assert config["train"]["max_steps"] == 6 and config["model"]["arch"]["hidden_size"] == 32

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    for key in ("loss", "lr", "grad_norm"):
        scalars = {e.step: e.value for e in events.Scalars(key)}
        assert scalars == pytest.approx({s: r[key] for s, r in jsonl.items()}, rel=1e-6), key
    assert {e.step: e.value for e in events.Scalars("eval_loss")} == pytest.approx(
        {3: evals[3]["eval_loss"], 6: evals[6]["eval_loss"]}
    )
    assert "max_steps: 6" in (tmp_path / "resolved_config.yaml").read_text()


def test_logging_backends_name_the_extra_when_missing_and_refuse_a_bad_mode(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(MissingPackageError, match=r"trainer\[wandb\]"):
        make_trainer(tmp_path, *TINY, "logger=wandb")
    message = composition_error(*TINY, "logger.wandb.mode=offlne")
    assert "Invalid value 'offlne', expected one of [online, offline, disabled]" in message
    assert "full_key: logger.wandb.mode" in message
    assert compose_config("logger=jsonl").logger.wandb.mode == "disabled"  # the default needs no extra


# ---- Docker and the scripts ----------------------------------------------------------------------------


def test_deepspeed_sh_passes_the_hostfile_and_one_run_dir_to_every_host(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=8\nnode1 slots=8\n")
    script = str(ROOT / "launch" / "deepspeed.sh")
    out = subprocess.run(
        [script, "--dry-run", "--hostfile", str(hostfile), "--run-id", "exp1", "strategy=zero3"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out[1:3] == ["-m", "deepspeed.launcher.runner"] and out[out.index("--hostfile") + 1] == str(
        hostfile
    )
    assert out[out.index("--module") :] == [
        "--module",
        "trainer.train",
        "strategy=zero3",
        "hydra.run.dir=outputs/deepspeed-exp1",
    ]
    given = subprocess.run(
        [script, "--dry-run", "hydra.run.dir=/runs/x"], capture_output=True, text=True, check=True
    )
    assert given.stdout.split()[-1] == "hydra.run.dir=/runs/x"  # the user's own directory, not a second one
    missing = subprocess.run([script, "--hostfile", str(tmp_path / "nope")], capture_output=True, text=True)
    assert missing.returncode == 2 and "not found" in missing.stderr


def test_dockerfile_passes_hadolint():
    proc = subprocess.run(
        [str(BIN / "hadolint"), "--failure-threshold", "warning", "docker/Dockerfile"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_launch_and_bench_scripts_pass_shellcheck():
    scripts = ["launch/torchrun.sh", "launch/deepspeed.sh", "launch/python.sh", "launch/slurm/train.sbatch"]
    scripts += ["bench/gpu_check.sh", "bench/gpu_wheels.sh"]
    proc = subprocess.run([str(BIN / "shellcheck"), *scripts], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
