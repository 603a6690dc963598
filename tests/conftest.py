"""Shared helpers: compose the real configs with overrides, and tiny settings that keep tests fast."""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir

from tests.preloaded import PreloadedServer, preload_enabled
from trainer.config import register_configs
from trainer.evaluate_config import register_evaluate_configs
from trainer.export_config import register_export_configs
from trainer.generate_config import register_generate_configs
from trainer.pipeline_config import register_pipeline_configs
from trainer.plan.config import register_plan_configs
from trainer.prepare_data_config import register_prepare_data_configs
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
# pydoc text with a 300-token byte-level BPE (GGUF describes it; the embedded corpus's word-level one it cannot).
BPE = [*TINY_MODEL, *TINY_LOOP, "data=pydoc", "data.tokenizer_vocab_size=300"]

# Training's schemas, and each other command's own, so that a test can compose any command's config.
register_configs()
register_quantize_configs()
register_evaluate_configs()
register_export_configs()
register_report_configs()
register_pipeline_configs()
register_prepare_data_configs()
register_generate_configs()
register_plan_configs()


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


@pytest.fixture(scope="session")
def bpe_run(tmp_path_factory) -> Path:
    """A tiny Llama trained 6 steps on pydoc text with the BPE above (its 300 ids short of 320 embeddings); the
    tests only read it (exports go elsewhere): trained once a session."""
    run = tmp_path_factory.mktemp("bpe_run")
    make_trainer(run, *BPE).train()
    return run


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct's tokenizer (real ChatML template, pad == eos), parsed from its GGUF once a session."""
    from tests.chat_fixtures import saved_smollm2_tokenizer

    return saved_smollm2_tokenizer(tmp_path_factory.mktemp("smollm2_tokenizer"))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_command(
    args: list[str],
    *,
    nproc: int = 1,
    timeout: int = 600,
    check: bool = True,
    launcher: str = "preloaded",
    module: str = "trainer.train",
):
    """`python -m MODULE ARGS` (by default the train command) with `nproc` ranks.

    launcher="preloaded" forks the ranks from a server that has the imports done (tests/preloaded.py);
    launcher="torchrun" runs torchrun (single-process runs: plain python) for tests of the launcher itself.
    """
    import subprocess

    if launcher == "preloaded" and preload_enabled():
        log = Path(tempfile.mkstemp(prefix="trainer-job-", suffix=".log")[1])
        try:
            proc = _server().run(
                list(args),
                nproc=nproc,
                port=free_port(),
                log=log,
                env=subprocess_env(),
                timeout=timeout,
                module=module,
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
        cmd = [PYTHON, *(torchrun if nproc > 1 else []), "-m", module, *args]
        proc = subprocess.run(
            cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=timeout
        )
    if check:
        assert proc.returncode == 0, failure_report(proc)
    return proc


# Runs `python -m MODULE ARGS` in a session of its own after `HOOK` (Python source) has patched the code to call
# ctrl_c() at a chosen point: SIGINT to the whole process group, as a terminal sends Ctrl-C.
CTRL_C_DRIVER = """
import os, runpy, signal, sys
def ctrl_c():
    os.killpg(0, signal.SIGINT)
module, hook, args = sys.argv[1], sys.argv[2], sys.argv[3:]
exec(hook)
sys.argv = [module, *args]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def default_ctrl_c() -> None:
    """A child's Ctrl-C as a terminal gives it (Popen's preexec_fn): a shell runs background jobs, `nohup` and
    some CI runners with SIGINT ignored, and an ignored signal stays ignored across exec, so a test run from
    there would send its Ctrl-C to processes that never see it."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_with_ctrl_c(module: str, args: list[str], *, hook: str, timeout: int = 300):
    """`python -m module args`, interrupted by Ctrl-C where `hook` calls ctrl_c(); the finished process."""
    import subprocess

    return subprocess.run(
        [PYTHON, "-c", CTRL_C_DRIVER, module, hook, *args],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        start_new_session=True,
        preexec_fn=default_ctrl_c,
    )


def failure_report(proc) -> str:
    """A failed job's output for the assertion: each rank's exit code, the first traceback in the output (with
    several ranks, the first rank to fail is usually the cause: the others then fail in a collective), the end."""
    output = proc.stdout if proc.stdout == proc.stderr else proc.stdout + proc.stderr
    codes = getattr(proc, "rank_codes", None)
    head = f"exit codes by rank: {codes}\n" if codes else f"exit code {proc.returncode}\n"
    first = output.find("Traceback (most recent call last)")
    if 0 <= first < len(output) - 4000:
        head += "first traceback:\n" + output[first : first + 4000] + "\n[...]\n"
    return head + "end of the output:\n" + output[-4000:]


_SERVER: PreloadedServer | None = None


def _server() -> PreloadedServer:
    global _SERVER
    if _SERVER is None:
        _SERVER = PreloadedServer(root=ROOT, env=subprocess_env())
        atexit.register(_SERVER.close)
    return _SERVER


# What a rank function of spawn_ranks needs imported: the server imports it once, before any torch op runs in it.
RANK_PRELOAD = [
    "tests.conftest",
    "datasets",
    "transformers",
    "trainer.loop",
    "trainer.strategies",
    "deepspeed",
    "deepspeed.runtime.zero.muon.muon_optimizer",  # ZeRO's optimizer check imports it: dynamo, inductor (~2 s)
]


def spawn_ranks(fn, *args: Any, nprocs: int = 2) -> None:
    """Run `fn(rank, *args)` in `nprocs` real processes and raise the first rank's exception, if any.

    As torch.multiprocessing.spawn, but each rank is forked from multiprocessing's forkserver, which imports
    RANK_PRELOAD once a session (a spawned rank pays those ~7 s of imports every time); `fn` and `args` are
    pickled to it. Like the train command's ranks (OMP_NUM_THREADS=1), each rank runs one thread: two ranks
    of two threads each would fight over 2 cores.
    """
    import multiprocessing

    import torch.multiprocessing

    multiprocessing.get_context("forkserver").set_forkserver_preload(RANK_PRELOAD)  # once it starts: no-op
    torch.multiprocessing.start_processes(
        _one_thread_rank, args=(fn, *args), nprocs=nprocs, join=True, start_method="forkserver"
    )


def _one_thread_rank(rank: int, fn, *args: Any) -> None:
    import torch

    torch.set_num_threads(1)
    fn(rank, *args)


def read_metrics(run_dir: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir: Path) -> dict[int, float]:
    """Step -> loss; a step logged twice (a restarted run) keeps its last value."""
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


# ---- tiers --------------------------------------------------------------------------------------------------
# `make test` runs every test; `make test-fast` deselects these markers (registered in pyproject.toml). They are
# set here, by the test function's name and by the fixtures it uses, never by file: a test keeps its tier when
# it moves to another file, and a name below that matches no test stops a full run at collection.
SLOW, MULTIRANK, LAUNCHER = "slow", "multirank", "launcher"
# "slow": over this on 2 shared cores, or a fresh Python process importing the trainer (~7 s of imports alone).
SLOW_SECONDS = 10

# Every test that uses one of these fixtures (directly or through another fixture).
FIXTURE_TIERS = {
    "chain": {SLOW, LAUNCHER},  # the compression chain, `python -m trainer.pipeline` three times (~70 s)
    "cluster": {SLOW, MULTIRANK, LAUNCHER},  # a Slurm controller and two slurmd nodes on this machine
    "fp32_run": {SLOW},  # a job of the preloaded server, which imports the trainer first
}
# By test function. A case parametrized to one process (nproc=1, strategy=single) is not multirank.
TEST_TIERS = {
    "test_sharded_ranks_follow_the_single_process_on_packed_conversations": {SLOW, MULTIRANK},
    "test_a_packed_windows_logits_equal_each_conversations_alone_under_fsdp_and_zero3_on_two_ranks": {
        SLOW,
        MULTIRANK,
    },
    "test_a_compiled_models_packed_logits_equal_each_conversations_logits_alone": {SLOW},  # ~35 s of compile
    "test_a_compiled_plan_is_within_10_percent_of_a_real_compiled_steps_peak": {SLOW},  # ~10 s of compile
    "test_bad_conversational_input_exits_2_with_one_paragraph_naming_the_fix": {SLOW},  # a fresh process
    "test_the_first_step_loss_and_gradients_are_the_mean_over_the_trained_tokens_of_the_global_batch": {SLOW},
    "test_a_teacher_equal_to_the_student_sees_the_same_positions_and_mask_its_divergence_is_zero": {SLOW},
    "test_adapters_train_on_packed_conversations_from_the_base_models_loss": {SLOW},
    "test_a_resumed_chat_run_continues_with_exactly_the_losses_of_a_straight_one": {SLOW},
    "test_our_loss_equals_trls_on_the_same_conversations_packed_and_not": {SLOW},  # imports TRL (~10 s)
    # ~12 s of CPU: a Hydra composition per command README.md and docs/ show
    "test_every_documented_command_composes_and_passes_the_commands_own_checks": {SLOW},
    "test_evaluate_tasks_give_the_accuracy_lm_evals_own_command_line_gives_on_the_same_directory": {SLOW},
    "test_bad_task_options_are_refused_before_any_model_loads": {SLOW},  # indexes lm-eval's tasks (~10 s)
    "test_every_bench_script_runs_its_quick_mode": {SLOW},  # every bench script, each its own processes
    "test_a_70b_plan_takes_under_a_minute_and_under_2_gb": {SLOW},  # a fresh process: its own peak memory
    # several ranks, each a job of the preloaded server, a torchrun or a spawned process
    "test_strategy_follows_the_single_process_run": {SLOW, MULTIRANK},
    "test_resume_under_another_strategy_and_world_size": {SLOW, MULTIRANK},
    "test_two_ranks_to_one_and_back_to_two": {SLOW, MULTIRANK},
    "test_two_ranks_report_each_ranks_peak_memory_and_write_each_ranks_profile": {SLOW, MULTIRANK},
    "test_single_strategy_with_several_ranks_is_refused": {MULTIRANK},
    "test_batch_that_does_not_divide_over_the_ranks_fails_before_training": {MULTIRANK},
    "test_checkpoint_converts_to_the_same_hf_export": {SLOW, MULTIRANK},
    "test_a_killed_rank_restarts_and_resumes_from_the_last_checkpoint": {SLOW, MULTIRANK},
    "test_zero_keeps_no_second_fp32_copy_of_fp32_weights": {SLOW, MULTIRANK},
    "test_two_ranks_follow_the_single_run_and_shard_the_teacher": {SLOW, MULTIRANK},
    "test_each_optimizer_trains_and_resumes_exactly": {SLOW, MULTIRANK},  # strategy=single: 60 s in process
    "test_two_ranks_stop_together_when_the_run_diverges": {SLOW, MULTIRANK},
    "test_a_bad_loss_on_one_rank_stops_or_skips_the_step_on_every_rank": {SLOW, MULTIRANK},
    "test_offloaded_zero_optimizers_train_and_resume_exactly": {SLOW, MULTIRANK},  # builds cpu_adam (~100 s)
    "test_mixed_precision_tracks_fp32": {MULTIRANK},
    "test_fp8_linears_train_tracking_fp32_and_export_fp32_weights": {MULTIRANK},
    "test_one_shot_masks_hold_through_fine_tuning_on_two_ranks": {SLOW, MULTIRANK},
    "test_qat_runs_under_single_and_ddp_and_converts_to_the_fake_quantized_function": {SLOW, MULTIRANK},
    "test_two_ddp_ranks_follow_the_single_process_loss": {SLOW, MULTIRANK},
    # one 2-rank spawn: 9 families x ddp, fsdp, zero3 (~25 s on 2 quiet cores)
    "test_every_family_trains_under_ddp_fsdp_and_zero3_on_two_ranks_as_in_one_process": {SLOW, MULTIRANK},
    "test_every_family_compiles_to_the_eager_losses": {SLOW},  # dynamo + AOT autograd, 9 models (~20 s)
    "test_an_error_one_rank_finds_under_torchrun_is_its_paragraph_once_and_no_rank_prints_a_traceback": {
        SLOW,
        MULTIRANK,
    },  # two real torchrun jobs
    # a fresh process, sent Ctrl-C
    "test_ctrl_c_checkpoints_says_how_to_continue_exits_130_and_resume_matches_the_uninterrupted_run": {SLOW},
    "test_ctrl_c_stops_prepare_data_with_one_line_and_the_same_command_continues_to_the_same_bytes": {SLOW},
    "test_adapters_on_two_ranks_follow_the_single_process": {SLOW, MULTIRANK},
    "test_adapter_checkpoint_resumes_under_another_strategy_and_world_size": {SLOW, MULTIRANK},
    "test_resume_on_two_ddp_ranks_continues_the_single_process_run": {
        SLOW,
        MULTIRANK,
    },  # 3 data=tokenized runs
    "test_two_zero2_ranks_refuse_a_deeper_checkpoint_naming_only_the_tensors_no_rank_takes": {
        SLOW,
        MULTIRANK,
    },
    # launchers: the deepspeed launcher, launch/ scripts, and the linters of launch/, bench/ and docker/
    "test_the_deepspeed_launcher_runs_the_same_command": {SLOW, MULTIRANK, LAUNCHER},
    "test_a_launcher_with_one_process_runs_zero_and_fsdp_like_the_single_process": {SLOW, LAUNCHER},
    "test_two_torchrun_sh_nodes_rendezvous_over_loopback_and_train_together": {SLOW, MULTIRANK, LAUNCHER},
    "test_torchrun_sh_refuses_several_nodes_without_a_head_or_a_run_id": {LAUNCHER},
    "test_deepspeed_sh_passes_the_hostfile_and_one_run_dir_to_every_host": {LAUNCHER},
    "test_dockerfile_passes_hadolint": {LAUNCHER},
    "test_launch_and_bench_scripts_pass_shellcheck": {LAUNCHER},
    # one process, but a fresh one (imports first) or a long one
    "test_deepspeed_on_cpu_compiles_no_shared_memory_all_reduce": {SLOW},  # a job of the preloaded server
    "test_train_command_writes_metrics_checkpoints_and_hf_export": {SLOW},
    "test_cfg_job_prints_the_resolved_config": {SLOW},
    "test_multirun_runs_one_job_per_value": {SLOW},
    "test_a_save_killed_half_way_leaves_the_previous_checkpoint_loadable": {SLOW},
    "test_quantize_evaluate_report_commands_compare_float_and_int8": {SLOW},  # quantize, evaluate, report
    "test_quantizing_and_evaluating_a_checkpoint_import_no_distillation_or_pruning_code": {
        SLOW
    },  # 2 commands
    "test_exporting_a_checkpoint_imports_no_distillation_or_pruning_code": {SLOW},  # a fresh Python process
    "test_compiled_model_trains_like_eager_and_compiles_eval_once": {SLOW},  # torch.compile (~42 s)
    "test_lora_compiled_trains_to_the_same_losses": {SLOW},  # torch.compile of the adapted model (~50 s)
    "test_activation_checkpointing_gives_the_same_losses": {SLOW},
    "test_two_prepares_are_byte_identical_whatever_the_number_of_processes": {
        SLOW
    },  # spawns 2 tokenizer processes  # 18 s measured, 2 shared cores
    "test_wandb_offline_and_tensorboard_log_the_metrics_and_a_resumed_run_continues_the_wandb_run": {SLOW},
    # tests/test_cli.py: a fresh Python process that forks each command (~12-20 s)
    "test_bad_inputs_to_every_command_exit_2_with_one_paragraph_naming_the_key_or_file": {SLOW},
    "test_trainer_traceback_shows_the_traceback": {SLOW},
    "test_no_stored_file_makes_a_command_run_a_models_code": {SLOW},
    "test_launch_scripts_use_the_checkouts_venv_when_no_python_is_given_and_say_which": {LAUNCHER},
    "test_the_pipeline_exits_2_when_a_stage_stops_with_an_explained_error": {SLOW, LAUNCHER},
    # tests/test_generate.py: fresh Python processes; the SmolLM2 GGUF takes ~20 s to load on 2 cores
    "test_bad_inputs_exit_2_with_one_paragraph_naming_the_key_or_file": {SLOW},
    "test_the_smollm2_gguf_answers_a_prompt_under_its_default_system_prompt": {SLOW},
}


def _tiers(item: pytest.Item) -> set[str]:
    params = item.callspec.params if hasattr(item, "callspec") else {}
    fixtures = set(item.fixturenames) - set(params)  # a parameter may share a fixture's name ("chain")
    tiers = set().union(*(FIXTURE_TIERS[f] for f in fixtures & FIXTURE_TIERS.keys()))
    by_name = TEST_TIERS.get(getattr(item, "originalname", item.name), set())
    if params.get("nproc") == 1 or params.get("strategy") == "single":
        by_name = by_name - {MULTIRANK}
    return tiers | by_name


def _check_tier_names(items: list[pytest.Item]) -> None:
    """Once every test file is collected, every name above must still match a test or a fixture."""
    if not set((ROOT / "tests").glob("test_*.py")) <= {item.path for item in items}:
        return  # a subset of the files was asked for
    names = {getattr(item, "originalname", item.name) for item in items}
    fixtures = set().union(*(item.fixturenames for item in items))
    stale = sorted((TEST_TIERS.keys() - names) | (FIXTURE_TIERS.keys() - fixtures))
    if stale:
        raise pytest.UsageError(
            f"tests/conftest.py's TEST_TIERS or FIXTURE_TIERS names no test or fixture: {', '.join(stale)}. "
            "Give the new name there, or remove the line if the test is gone."
        )


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    _check_tier_names(items)
    for item in items:
        for tier in sorted(_tiers(item)):
            item.add_marker(tier)


_UNMARKED_SECONDS: dict[str, float] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if SLOW not in report.keywords:  # setup (module fixtures included), call and teardown
        _UNMARKED_SECONDS[report.nodeid] = _UNMARKED_SECONDS.get(report.nodeid, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter) -> None:
    """Name the tests outside the slow tier that took longer than it allows: a note, never a failure."""
    over = sorted(((s, n) for n, s in _UNMARKED_SECONDS.items() if s > SLOW_SECONDS), reverse=True)
    if over:
        terminalreporter.section(f"over {SLOW_SECONDS} s without the slow marker")
        for seconds, nodeid in over:
            terminalreporter.write_line(f"{seconds:6.1f}s {nodeid}")
        terminalreporter.write_line(
            "Mark them slow in tests/conftest.py's TEST_TIERS, unless the machine was busy."
        )


def strip_model_description(step: Path, overrides: list[str]) -> None:
    """Make checkpoint `step` one written before checkpoints held config.json and the tokenizer: those files
    gone (the checksum manifest too: it came later), and the run's resolved config beside it (what Hydra
    writes), which the fallback reads instead."""
    from omegaconf import OmegaConf

    for f in step.iterdir():
        if f.is_file() and f.name != "trainer_state.json":
            f.unlink()
    state = json.loads((step / "trainer_state.json").read_text())
    state.pop("manifest", None)
    (step / "trainer_state.json").write_text(json.dumps(state))
    run_dir = step.parent.parent
    (run_dir / ".hydra").mkdir(exist_ok=True)
    OmegaConf.save(compose_config(*overrides), run_dir / ".hydra" / "config.yaml")


def tiny_llama(vocab_size: int, *, dtype: Any = None, seed: int = 0) -> Any:
    """A 2-block Llama (hidden 64, grouped-query attention, tied embeddings) with a wide init, in eval mode, in
    `dtype` (default float32)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        initializer_range=0.1,
    )
    torch.manual_seed(seed)
    # dtype= as from_pretrained sets it: the rotary frequencies stay float32 (.to(dtype) would round them).
    return AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32).eval()
