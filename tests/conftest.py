"""Shared helpers: compose the real configs with overrides, and tiny settings that keep tests fast."""

from __future__ import annotations

import atexit
import hashlib
import os
import sys
import tempfile
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from tests.preloaded import PreloadedServer, preload_enabled
from trainer.config import register_configs
from trainer.evaluate_config import register_evaluate_configs
from trainer.pipeline_config import register_pipeline_configs
from trainer.quant.config import register_quantize_configs
from trainer.report_config import register_report_configs
from trainer.train import CONF_DIR

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable

# A ~50k-parameter Llama; a step takes milliseconds.
TINY_MODEL = [
    "model.arch.hidden_size=32",
    "model.arch.intermediate_size=64",
    "model.arch.num_hidden_layers=2",
    "model.arch.num_attention_heads=2",
    "model.arch.num_key_value_heads=2",
]
TINY_LOOP = [
    "data.seq_len=32",
    "train.micro_batch_size=4",
    "train.global_batch_size=8",
    "train.max_steps=6",
    "train.log_every=2",
    "train.eval_every=0",
    "train.progress_bar=false",
    "checkpoint.every_steps=0",
]
# A small embedded corpus (64 words).
TINY_MARKOV = [
    "data.markov.num_words=64",
    "data.markov.successors=4",
    "data.markov.train_tokens=20000",
    "data.markov.eval_tokens=2000",
    "data.markov.mean_doc_words=40",
]
TINY = TINY_MODEL + TINY_LOOP + TINY_MARKOV

# Training's schemas, and each other command's own, so that a test can compose any command's config.
register_configs()
register_quantize_configs()
register_evaluate_configs()
register_report_configs()
register_pipeline_configs()


def compose_config(*overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return compose("config", overrides=list(overrides))


def composition_error(*overrides: str, config: str = "config") -> str:
    """Hydra's refusal to compose `config` with `overrides`, with OmegaConf's cause under it: for a value
    outside a closed choice, `Invalid value 'X', expected one of [...]` and `full_key: KEY`."""
    from hydra.errors import ConfigCompositionException

    with (
        pytest.raises(ConfigCompositionException) as refused,
        initialize_config_dir(config_dir=CONF_DIR, version_base=None),
    ):
        compose(config, overrides=list(overrides))
    return f"{refused.value}\n{refused.value.__cause__}"


# DeepSpeed JIT-builds its CPU ops (cpu_adam, shm comm) keyed by source paths: one build directory per venv, so
# that two checkouts with their own venvs do not rebuild each other's ops over and over.
os.environ.setdefault(
    "TORCH_EXTENSIONS_DIR",
    str(Path.home() / ".cache" / "torch_extensions" / hashlib.sha1(sys.prefix.encode()).hexdigest()[:12]),
)


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


@pytest.fixture
def tiny_overrides() -> list[str]:
    return list(TINY)


def make_trainer(run_dir: Path, *overrides: str):
    from trainer.distributed import ParallelEnv
    from trainer.loop import Trainer

    return Trainer(compose_config(*overrides), run_dir=run_dir, env=ParallelEnv())


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_command(
    args: list[str], *, nproc: int = 1, timeout: int = 600, check: bool = True, launcher: str = "preloaded"
):
    """`python -m trainer.train ARGS` with `nproc` ranks.

    launcher="preloaded" forks the ranks from a server that has the imports done (tests/preloaded.py);
    launcher="torchrun" runs torchrun (single-process runs: plain python) for tests of the launcher itself.
    """
    import subprocess

    if launcher == "preloaded" and preload_enabled():
        log = Path(tempfile.mkstemp(prefix="trainer-job-", suffix=".log")[1])
        try:
            proc = _server().run(
                list(args), nproc=nproc, port=free_port(), log=log, env=subprocess_env(), timeout=timeout
            )
        finally:
            log.unlink(missing_ok=True)
    else:
        torchrun = [
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_port",
            str(free_port()),
        ]
        cmd = [PYTHON, *(torchrun if nproc > 1 else []), "-m", "trainer.train", *args]
        proc = subprocess.run(
            cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=timeout
        )
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


_SERVER: PreloadedServer | None = None


def _server() -> PreloadedServer:
    global _SERVER
    if _SERVER is None:
        _SERVER = PreloadedServer(root=ROOT, env=subprocess_env())
        atexit.register(_SERVER.close)
    return _SERVER


def read_metrics(run_dir: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir: Path) -> dict[int, float]:
    """Step -> loss; a step logged twice (a restarted run) keeps its last value."""
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}
