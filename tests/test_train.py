"""The real command end to end: outputs, --cfg job, multirun, and two ranks under torchrun."""

import json
import socket
import subprocess

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import PYTHON, ROOT, TINY, run_command, subprocess_env


def run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [PYTHON, *args], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_train_command_writes_metrics_checkpoints_and_hf_export(tmp_path):
    out = run(
        "-m",
        "trainer.train",
        *TINY,
        "train.eval_every=3",
        "checkpoint.every_steps=3",
        f"hydra.run.dir={tmp_path}",
    )
    assert "done: 6 steps" in out.stdout and "entropy floor" in out.stdout
    for noise in ("Failed to load", "is an Enum subclass", "Setting accelerator to CPU"):  # trainer/quiet.py
        assert noise not in out.stdout + out.stderr
    lines = records(tmp_path / "metrics.jsonl")
    train = [r for r in lines if "loss" in r]
    assert [r["step"] for r in train] == [2, 4, 6]
    for r in train:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "peak_mem_bytes"} <= r.keys()
        assert r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 and r["peak_mem_bytes"] > 0
    evals = [r for r in lines if "eval_loss" in r]
    assert [r["step"] for r in evals] == [3, 6]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    assert (tmp_path / "checkpoints" / "step_00000003" / "trainer_state.json").is_file()
    AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    AutoTokenizer.from_pretrained(tmp_path / "hf")


def test_cfg_job_prints_the_resolved_config():
    out = run("-m", "trainer.train", "--cfg", "job", "train.max_steps=7")
    assert "max_steps: 7" in out.stdout and "model_type: llama" in out.stdout


def test_multirun_runs_one_job_per_value(tmp_path):
    run(
        "-m",
        "trainer.train",
        "-m",
        *TINY,
        "train.max_steps=2",
        "scheduler=constant",
        "optimizer.lr=1e-3,2e-3",
        f"hydra.sweep.dir={tmp_path}",
    )
    lrs = sorted(records(tmp_path / str(i) / "metrics.jsonl")[0]["lr"] for i in (0, 1))
    assert lrs == pytest.approx([1e-3, 2e-3])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ddp_ranks_follow_the_single_process_loss(tmp_path):
    common = [*TINY, "train.max_steps=8", "scheduler=constant", "train.log_every=1", "train.export_hf=false"]
    run_command([*common, f"hydra.run.dir={tmp_path / 'single'}"])  # the reference: a preloaded job suffices
    run(
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        "-m",
        "trainer.train",
        *common,
        "strategy=ddp",
        f"hydra.run.dir={tmp_path / 'ddp'}",
    )
    single = [r["loss"] for r in records(tmp_path / "single" / "metrics.jsonl") if "loss" in r]
    ddp = [r["loss"] for r in records(tmp_path / "ddp" / "metrics.jsonl") if "loss" in r]
    assert len(single) == len(ddp) == 8
    assert torch.allclose(torch.tensor(ddp), torch.tensor(single), rtol=1e-4, atol=1e-5), (single, ddp)
    # Rank 0 alone writes: one metrics file with one line per step, and no Hydra files from rank 1.
    assert not list((tmp_path / "ddp").glob("*rank*"))
