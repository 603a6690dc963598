"""Every strategy against the single-process reference, with 2 real CPU ranks (gloo) under torchrun, and with
one process (a one-rank group) started alone or by a launcher.

Tolerance: losses within 1e-4 relative and final weights within 1e-5 absolute of the single-process
run. The strategies compute the same sums in another order (all-reduce, reduce-scatter, flat
partitions), so results agree to float32 rounding, not bitwise.
"""

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import TINY, run_command, train_losses
from trainer.errors import ConfigError, MissingPackageError

STEPS = 10
# Global batch 8 = 2 ranks x micro 2 x 2 accumulation steps (4 accumulation steps in the single run).
COMMON = [
    *TINY,
    f"train.max_steps={STEPS}",
    "train.micro_batch_size=2",
    "train.log_every=1",
    "scheduler=constant",
]
STRATEGIES = ["ddp", "fsdp", "zero1", "zero2", "zero3"]


def hf_weights(run_dir):
    return load_file(str(run_dir / "hf" / "model.safetensors"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single")
    run_command([*COMMON, f"hydra.run.dir={run_dir}"])
    return run_dir


@pytest.mark.parametrize(
    "strategy,extra,nproc",
    [(s, [], 2) for s in STRATEGIES]
    + [(s, [], 1) for s in STRATEGIES]  # one process started alone: a one-rank group
    + [
        ("fsdp", ["train.activation_checkpointing=true"], 2),
        ("fsdp", ["strategy.defer_grad_sync=true"], 2),  # one reduce-scatter per step, not per micro-batch
        ("zero3", ["train.activation_checkpointing=true"], 2),
        ("fsdp", ["train.activation_checkpointing=selective"], 2),
        ("zero3", ["train.activation_checkpointing=selective"], 2),
        ("zero3", ["strategy.offload_optimizer=cpu", "strategy.offload_params=cpu"], 2),
        ("zero3", ["strategy.offload_optimizer=cpu", "strategy.offload_params=cpu"], 1),  # ZeRO-Infinity
        ("fsdp", ["strategy.replicate_degree=2"], 4),  # HSDP: 2 replicas of 2-way shards
    ],
)
def test_strategy_follows_the_single_process_run(strategy, extra, nproc, reference, tmp_path):
    run_command([*COMMON, f"strategy={strategy}", *extra, f"hydra.run.dir={tmp_path}"], nproc=nproc)
    want, got = train_losses(reference), train_losses(tmp_path)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-4), (step, want, got)
    a, b = hf_weights(reference), hf_weights(tmp_path)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4, msg=f"{strategy}: {k}")


@pytest.mark.parametrize(
    "first,second",
    [
        (("zero3", 2), ("fsdp", 2)),
        (("fsdp", 2), ("zero3", 2)),
        (("zero2", 2), ("single", 1)),
        (("ddp", 2), ("zero1", 2)),
        # world size 1 (a one-rank group) to 2 and back
        (("zero3", 1), ("fsdp", 2)),
        (("fsdp", 1), ("zero1", 2)),
        (("fsdp", 2), ("zero3", 1)),
        (("zero2", 2), ("fsdp", 1)),
    ],
)
def test_resume_under_another_strategy_and_world_size(first, second, reference, tmp_path):
    half = [*COMMON, "checkpoint.every_steps=5", f"hydra.run.dir={tmp_path}"]
    run_command([*half, f"strategy={first[0]}", "train.max_steps=5"], nproc=first[1])
    run_command([*half, f"strategy={second[0]}", "resume=auto"], nproc=second[1])
    want, got = train_losses(reference), train_losses(tmp_path)
    for step in range(6, STEPS + 1):  # the steps taken after the resume
        assert got[step] == pytest.approx(want[step], rel=1e-4), (step, want, got)
    a, b = hf_weights(reference), hf_weights(tmp_path)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4)


def test_two_ranks_to_one_and_back_to_two(reference, tmp_path):
    common = [*COMMON, "checkpoint.every_steps=1", f"hydra.run.dir={tmp_path}", "resume=auto"]
    run_command([*common, "strategy=fsdp", "train.max_steps=4"], nproc=2)
    run_command([*common, "strategy=single", "train.max_steps=7"])
    run_command([*common, "strategy=zero3"], nproc=2)
    want, got = train_losses(reference), train_losses(tmp_path)
    assert got[STEPS] == pytest.approx(want[STEPS], rel=1e-4)


def test_two_ranks_report_each_ranks_peak_memory_and_write_each_ranks_profile(reference, tmp_path):
    profile = ["profile.enabled=true", "profile.start_step=2", "profile.steps=1"]
    run_command(
        [*COMMON, "strategy=ddp", "train.max_steps=2", *profile, f"hydra.run.dir={tmp_path}"], nproc=2
    )
    from tests.conftest import read_metrics

    record = next(r for r in read_metrics(tmp_path) if "loss" in r)
    assert len(record["peak_mem_bytes_per_rank"]) == 2 and record["peak_mem_bytes"] == max(
        record["peak_mem_bytes_per_rank"]
    )
    for rank in (0, 1):
        summary = json.loads((tmp_path / "profile" / f"rank{rank}_summary.json").read_text())
        # DDP's gradient all-reduce over gloo is the communication each rank records
        assert summary["steps"] == [2, 2] and summary["by_kind_s"]["communication"] > 0


def test_deepspeed_on_cpu_compiles_no_shared_memory_all_reduce(tmp_path, monkeypatch):
    """DeepSpeed's CPU backend JIT-builds a shared-memory all-reduce (inference only, ~45 s on 2 cores) on its
    first initialize in a fresh extensions directory, unless the strategy tells it not to."""
    extensions = tmp_path / "torch_extensions"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(extensions))
    proc = run_command([*COMMON, "strategy=zero1", "train.max_steps=1", f"hydra.run.dir={tmp_path / 'run'}"])
    assert "done: 1 steps" in proc.stdout and "shm_comm" not in proc.stdout
    assert not extensions.exists() or not any(extensions.iterdir())


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_a_launcher_with_one_process_runs_zero_and_fsdp_like_the_single_process(
    launcher, reference, tmp_path
):
    import subprocess

    from tests.conftest import PYTHON, ROOT, free_port, subprocess_env

    port = ["--master_port", str(free_port())]
    launch = {  # each runs `python -m trainer.train` in one process, with the launcher's RANK, MASTER_ADDR
        "torchrun": [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "1", *port, "-m"],
        "deepspeed": [PYTHON, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", *port, "--module"],
    }[launcher]
    want = train_losses(reference)
    for strategy in ("zero3", "fsdp"):
        run_dir = tmp_path / strategy
        proc = subprocess.run(
            [*launch, "trainer.train", *COMMON, f"strategy={strategy}", f"hydra.run.dir={run_dir}"],
            cwd=ROOT,
            env=subprocess_env(),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "1 rank(s)" in proc.stdout
        got = train_losses(run_dir)
        assert sorted(got) == sorted(want)
        assert all(got[s] == pytest.approx(want[s], rel=1e-4) for s in want), (strategy, want, got)


def test_a_lone_process_gets_a_one_rank_group_without_any_setting(monkeypatch):
    import os

    import torch.distributed as dist

    from trainer.distributed import ParallelEnv, destroy, init_distributed

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(name, "unset")  # recorded, so that the teardown restores what was there
        monkeypatch.delenv(name)
    cpu = torch.device("cpu")
    init_distributed(ParallelEnv(), backend=None, device=cpu)
    assert not dist.is_initialized()  # the one-process strategy: no group, as before
    try:
        init_distributed(ParallelEnv(), backend=None, device=cpu, one_rank_group=True)
        assert dist.get_world_size() == 1 and dist.get_rank() == 0
        t = torch.tensor([3.0])
        dist.all_reduce(t)
        assert t.item() == 3.0
        assert "MASTER_ADDR" not in os.environ and "MASTER_PORT" not in os.environ  # no rendezvous
    finally:
        destroy()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_distributed_strategies_accept_a_lone_process(strategy):
    from tests.conftest import compose_config
    from trainer.distributed import ParallelEnv
    from trainer.strategies import build_strategy

    built = build_strategy(compose_config(f"strategy={strategy}"), ParallelEnv(), torch.device("cpu"))
    assert not built.one_process  # so the loop sets up a one-rank group


def test_hsdp_replicas_must_still_divide_a_world_of_one():
    from tests.conftest import compose_config
    from trainer.distributed import ParallelEnv
    from trainer.strategies import build_strategy

    cfg = compose_config("strategy=fsdp", "strategy.replicate_degree=2")
    with pytest.raises(ConfigError, match="does not divide the world size 1"):
        build_strategy(cfg, ParallelEnv(), torch.device("cpu"))


def test_single_strategy_with_several_ranks_is_refused(tmp_path):
    proc = run_command([*TINY, "strategy=single", f"hydra.run.dir={tmp_path}"], nproc=2, check=False)
    assert proc.returncode != 0 and "strategy=single runs one process" in proc.stderr


def test_the_deepspeed_launcher_runs_the_same_command(reference, tmp_path):
    import subprocess

    from tests.conftest import PYTHON, ROOT, free_port, subprocess_env

    launcher = [
        PYTHON,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
    ]
    args = [*COMMON, "strategy=zero2", f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run(
        [*launcher, "--module", "trainer.train", *args],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 rank(s)" in proc.stdout  # both ranks found from the launcher's environment
    want, got = train_losses(reference), train_losses(tmp_path)
    assert sorted(got) == sorted(want)
    assert all(got[s] == pytest.approx(want[s], rel=1e-4) for s in want)


def test_rank_world_size_and_local_rank_come_from_the_launchers_environment():
    from trainer.distributed import ParallelEnv, read_env

    torchrun = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "9"}
    assert read_env(torchrun) == ParallelEnv(3, 4, 1)  # torchrun's (and deepspeed's) variables win
    srun = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "MASTER_ADDR": "node0"}
    assert read_env(srun) == ParallelEnv(5, 8, 1)
    assert read_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == ParallelEnv()  # an allocation, no srun job
    assert read_env({}) == ParallelEnv()


def test_deepspeed_missing_names_the_extra(monkeypatch):
    import sys

    from tests.conftest import compose_config
    from trainer.distributed import ParallelEnv
    from trainer.strategies import build_strategy

    monkeypatch.setitem(sys.modules, "deepspeed", None)
    with pytest.raises(MissingPackageError, match=r"trainer\[deepspeed\]"):
        build_strategy(compose_config("strategy=zero2"), ParallelEnv(0, 2, 0), torch.device("cpu"))


def test_deepspeed_config_follows_ours_and_takes_extra_keys():
    from tests.conftest import compose_config
    from trainer.strategies import deepspeed_config

    overrides = ["train.micro_batch_size=2", "train.global_batch_size=16", "train.grad_clip=0.5"]
    cfg = compose_config("strategy=zero3", *overrides)
    ds = deepspeed_config(stage=3, train=cfg.train, strategy=cfg.strategy, world_size=2, hidden_size=64)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"]) == (16, 2)
    assert ds["gradient_accumulation_steps"] == 4 and ds["gradient_clipping"] == 0.5  # 16 = 2 x 2 ranks x 4
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["reduce_bucket_size"] == 64 * 64  # scaled to the width
    assert zero["stage3_param_persistence_threshold"] == 640

    extra = (
        "strategy.deepspeed={zero_optimization: {reduce_bucket_size: 1000}, flops_profiler: {enabled: true}}"
    )
    cfg = compose_config("strategy=zero3", *overrides, extra)
    ds = deepspeed_config(stage=3, train=cfg.train, strategy=cfg.strategy, world_size=2, hidden_size=64)
    assert ds["zero_optimization"]["reduce_bucket_size"] == 1000  # the user's key wins ...
    assert ds["zero_optimization"]["stage"] == 3 and ds["flops_profiler"] == {
        "enabled": True
    }  # ... and merges


def test_batch_that_does_not_divide_over_the_ranks_fails_before_training(tmp_path):
    proc = run_command(
        [
            *TINY,
            "strategy=ddp",
            "train.micro_batch_size=3",
            "train.global_batch_size=9",
            f"hydra.run.dir={tmp_path}",
        ],
        nproc=2,
        check=False,
    )
    assert proc.returncode != 0 and "not divisible" in proc.stderr
    assert not (tmp_path / "metrics.jsonl").exists()
    # Every rank refuses it and the launcher ends the others as soon as one fails: rank 0 still says it, once,
    # as one paragraph, and the job's status is 2 (trainer/cli.py).
    output = proc.stdout if proc.stdout == proc.stderr else proc.stdout + proc.stderr  # preloaded: one stream
    assert proc.returncode == 2 and "Traceback" not in output
    assert [line for line in output.splitlines() if line.startswith("error")] == [
        next(line for line in output.splitlines() if line.startswith("error: train.global_batch_size=9"))
    ]


def test_checkpoint_converts_to_the_same_hf_export(tmp_path):
    run_command([*COMMON, "strategy=zero3", f"hydra.run.dir={tmp_path}"], nproc=2)
    from trainer.export import export_checkpoint

    export_checkpoint(tmp_path / "checkpoints" / f"step_{STEPS:08d}", tmp_path / "converted")
    a, b = hf_weights(tmp_path), load_file(str(tmp_path / "converted" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_killed_rank_restarts_and_resumes_from_the_last_checkpoint(tmp_path):
    import os
    import signal
    import subprocess
    import time

    from tests.conftest import PYTHON, ROOT, free_port, read_metrics, subprocess_env

    max_steps, every = 300, 50  # the kill lands past step 70: 230 steps (~6 s) before the run would end
    args = [
        *COMMON,
        "strategy=ddp",
        f"train.max_steps={max_steps}",
        f"checkpoint.every_steps={every}",
        "train.log_every=10",
    ]
    args += ["train.export_hf=false", "resume=auto", f"hydra.run.dir={tmp_path}"]
    cmd = [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--max-restarts", "1"]
    cmd += ["--master_port", str(free_port()), "-m", "trainer.train", *args]
    log = tmp_path / "torchrun.log"  # a file, not a pipe: a hung run must still show what it printed
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=subprocess_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    metrics, killed_at = tmp_path / "metrics.jsonl", None
    deadline = time.time() + 300
    while killed_at is None and time.time() < deadline and proc.poll() is None:
        steps = [r["step"] for r in read_metrics(tmp_path)] if metrics.exists() else []
        if steps and steps[-1] > every + 20:
            # The first pass as logged so far: the restart drops the records after its checkpoint.
            first = {r["step"]: r["loss"] for r in read_metrics(tmp_path) if "loss" in r}
            workers = subprocess.run(
                ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True
            ).stdout.split()
            os.kill(int(workers[-1]), signal.SIGKILL)  # one rank dies mid-run
            killed_at = steps[-1]
        time.sleep(0.05)
    try:
        proc.wait(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"the restarted run hung; torchrun printed:\n{log.read_text()[-4000:]}")
    out = log.read_text()
    assert killed_at is not None and killed_at < max_steps, "the run ended before a rank could be killed"
    assert proc.returncode == 0, out[-4000:]
    records = [r for r in read_metrics(tmp_path) if "loss" in r]
    assert records[-1]["step"] == max_steps
    # The restart resumed from the checkpoint that preceded the kill ...
    resumed = re.findall(r"resumed from \S*step_(\d{8})", out)
    assert len(resumed) == 1, out[-4000:]
    resumed_from = int(resumed[0])
    assert resumed_from % every == 0 and resumed_from <= killed_at
    # ... its metrics.jsonl holds each step once (the first pass's records after the checkpoint were dropped) ...
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps))
    # ... and the replayed steps repeat the first pass exactly.
    replay = {r["step"]: r["loss"] for r in records if resumed_from < r["step"] <= max(first)}
    assert replay and all(replay[s] == first[s] for s in replay)
    assert not list((tmp_path / "checkpoints").glob(".*.tmp"))


def test_compile_under_zero3_is_refused_with_the_alternative():
    from tests.conftest import compose_config
    from trainer.distributed import ParallelEnv
    from trainer.strategies import build_strategy

    with pytest.raises(ConfigError, match="strategy=fsdp"):
        build_strategy(
            compose_config("strategy=zero3", "train.compile=true"), ParallelEnv(0, 2, 0), torch.device("cpu")
        )


@pytest.mark.parametrize("world_size", [1, 2])
def test_fsdp_cpu_offload_on_a_cpu_run_explains_itself(world_size):
    from tests.conftest import compose_config
    from trainer.distributed import ParallelEnv
    from trainer.strategies import build_strategy

    with pytest.raises(ConfigError, match="strategy.cpu_offload=false"):
        build_strategy(
            compose_config("strategy=fsdp", "strategy.cpu_offload=true"),
            ParallelEnv(0, world_size, 0),
            torch.device("cpu"),
        )


def _master_shares_the_weights(rank: int, port: int, stage: int, run_dir: str) -> None:
    """One of 2 ranks: DeepSpeed's fp32 master partition is the fp32 weights' partition, through a step."""
    import os

    from tests.conftest import compose_config
    from trainer.distributed import ParallelEnv, destroy
    from trainer.loop import Trainer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    try:
        trainer = Trainer(
            compose_config(*COMMON, f"strategy=zero{stage}"), run_dir=run_dir, env=ParallelEnv(rank, 2, rank)
        )
        opt = trainer.optimizer
        if stage == 3:
            pairs = list(zip(opt.fp32_partitioned_groups_flat, opt.fp16_partitioned_groups_flat, strict=True))
        else:
            pairs = [
                (m, parts[rank])
                for m, parts in zip(
                    opt.single_partition_of_fp32_groups, opt.parallel_partitioned_bit16_groups, strict=True
                )
            ]
        before = [w.clone() for _, w in pairs]
        trainer.train_step()
        for (master, weight), old in zip(pairs, before, strict=True):
            assert master.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr()
            assert not torch.equal(weight, old)  # the step reached the weights through the shared storage
        if stage != 3:  # the checkpoint's fragment views follow the shared storage too
            for p in opt.bit16_groups[0]:
                if getattr(p, "_hp_mapping", None) is not None:
                    frag = p._hp_mapping.get_hp_fragment()
                    assert frag.untyped_storage().data_ptr() == pairs[0][0].untyped_storage().data_ptr()
        del trainer, opt, pairs
    finally:
        destroy()


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_keeps_no_second_fp32_copy_of_fp32_weights(stage, tmp_path):
    from tests.conftest import free_port, spawn_ranks

    spawn_ranks(_master_shares_the_weights, free_port(), stage, str(tmp_path))
