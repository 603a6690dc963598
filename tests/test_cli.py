"""Errors a person can read (trainer/cli.py), and run directories that are data, not code.

Every command prints an error that is ours to explain as one paragraph, with no traceback, and exits 2. The
commands run here as separate processes, each forked by the pipeline's fork launcher from one Python process
that did the imports once (the commands themselves run as `python -m MODULE`, from scratch).

A crafted local "hub" model whose Python code writes a marker file when imported checks that no stored file
(a run's .hydra/config.yaml, a checkpoint's config.json) makes our commands run it: only the command line can.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.conftest import PYTHON, ROOT, TINY_MARKOV, TINY_MODEL, free_port, subprocess_env
from trainer.cli import EXIT_USAGE, explain, run
from trainer.errors import (
    ConfigError,
    CorruptFileError,
    DataError,
    InputNotFoundError,
    LossScaleError,
    MissingPackageError,
    TrainerError,
)

# Runs each case as `python -m MODULE ARGS` in a child forked by trainer.pipeline's fork launcher, with the
# case's extra environment; writes [{"code": ..., "output": ...}] as JSON.
DRIVER = """
import json, os, sys
from pathlib import Path
from trainer.pipeline import preload, run_forked
cases, out = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
preload()
results = []
for i, case in enumerate(cases):
    saved = dict(os.environ)
    os.environ.update(case.get("env", {}))
    log = out.parent / f"case{i}.log"
    code = run_forked(case["module"], case["args"], log)
    os.environ.clear()
    os.environ.update(saved)
    results.append({"code": code, "output": log.read_text() if log.exists() else ""})
out.write_text(json.dumps(results))
"""


def run_commands(tmp_path: Path, cases: list[dict]) -> list[dict]:
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    env = subprocess_env() | {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "hf_modules")}
    env.pop("TRAINER_TRACEBACK", None)
    proc = subprocess.run(
        [PYTHON, "-c", DRIVER, str(tmp_path / "cases.json"), str(tmp_path / "results.json")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((tmp_path / "results.json").read_text())


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error: ")]


def assert_explained(result: dict, *names: str) -> None:
    """Exit status 2, no traceback, one `error:` paragraph that names each of `names`."""
    output = result["output"]
    assert result["code"] == EXIT_USAGE, output[-3000:]
    assert not any(line.startswith("Traceback") for line in output.splitlines()), output[-3000:]
    assert "HYDRA_FULL_ERROR" not in output, output[-3000:]
    assert "Error executing job" not in output, output[-3000:]  # Hydra's own line over ours
    [line] = error_lines(output)
    for name in names:
        assert name in line, (name, line)


def tiny_llama_dir(path: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainer.data.tokenizer import build_wordlevel_tokenizer

    config = LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64
    )
    LlamaForCausalLM(config).save_pretrained(str(path))
    build_wordlevel_tokenizer(["a b c d e f"] * 4).save_pretrained(str(path))
    return path


def bad_jsonl(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


GOOD = [json.dumps({"text": f"words {i} and more"}).encode() for i in range(20)]
LOOP = [*TINY_MARKOV, "data.seq_len=16", "train.max_steps=1"]
DATA = [*TINY_MODEL, *LOOP, "data.tokenizer=wordlevel"]
USER_DATA = [*TINY_MODEL, "data.seq_len=16", "train.max_steps=1", "data=hf", "data.tokenizer=wordlevel"]


class RunsCode:
    """Pickled, it names a global (print) that torch's safe loader refuses, as a pickle that runs code would."""

    def __reduce__(self):
        return (print, ("this pickle ran code",))


def pickled_model_dir(path: Path, hf: Path) -> Path:
    """A model directory whose only weights are a pickle torch.load(weights_only=True) refuses."""
    import shutil

    shutil.copytree(hf, path, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save({"model.embed_tokens.weight": torch.zeros(2), "hook": RunsCode()}, path / "pytorch_model.bin")
    return path


def tokenizer_without_eos(path: Path) -> Path:
    from trainer.data.tokenizer import build_wordlevel_tokenizer

    tokenizer = build_wordlevel_tokenizer(["a b c d e f"] * 4)
    tokenizer.eos_token = None
    tokenizer.save_pretrained(str(path))
    return path


def checkpoint_of_seq_len(run_dir: Path, seq_len: int) -> Path:
    """A run directory whose one checkpoint says it was taken with data.seq_len=`seq_len` (its trainer_state.json,
    as a save writes it: the refusal comes before anything else of the checkpoint is read)."""
    step = run_dir / "checkpoints" / "step_00000002"
    step.mkdir(parents=True)
    (step / "trainer_state.json").write_text(json.dumps({"step": 2, "seq_len": seq_len}))
    return step


# ---- the handler, in process ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [ConfigError, DataError, MissingPackageError, LossScaleError, InputNotFoundError, CorruptFileError],
)
def test_each_error_of_ours_prints_one_paragraph_and_exits_2(error, capsys, monkeypatch):
    monkeypatch.delenv("TRAINER_TRACEBACK", raising=False)
    monkeypatch.delenv("RANK", raising=False)

    def main():
        raise error("model.x=1: the key and the fix\n\nsecond line")

    with pytest.raises(SystemExit) as exited:
        run(main)
    assert exited.value.code == EXIT_USAGE
    err = capsys.readouterr().err
    assert err == "error: model.x=1: the key and the fix\nsecond line\n"


def test_a_new_error_type_is_explained_when_it_inherits_the_marker():
    class CheckpointError(TrainerError, RuntimeError):  # as another module may add to trainer/errors.py
        pass

    assert explain(CheckpointError("step_00000002/shards: damaged")) == "step_00000002/shards: damaged"
    assert explain(RuntimeError("a bug")) is None and explain(KeyError("x")) is None


def test_a_bug_keeps_its_traceback_and_trainer_traceback_shows_every_one(capsys, monkeypatch):
    monkeypatch.delenv("TRAINER_TRACEBACK", raising=False)

    def bug():
        raise KeyError("not ours")

    with pytest.raises(KeyError):
        run(bug)

    def ours():
        raise ConfigError("explained")

    monkeypatch.setenv("TRAINER_TRACEBACK", "1")
    with pytest.raises(ConfigError):
        run(ours)
    assert capsys.readouterr().err == ""


def test_rank_0_prints_at_once_another_rank_only_after_the_grace_and_every_rank_exits_2(capsys, monkeypatch):
    import trainer.cli

    monkeypatch.delenv("TRAINER_TRACEBACK", raising=False)
    waits = []
    monkeypatch.setattr(trainer.cli.time, "sleep", waits.append)  # a launcher would end rank 1 meanwhile

    def main():
        raise ConfigError("train.global_batch_size=7: not divisible")

    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit) as exited:
        run(main)
    assert exited.value.code == EXIT_USAGE and waits == []
    assert capsys.readouterr().err == "error: train.global_batch_size=7: not divisible\n"
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as exited:
        run(main)
    assert exited.value.code == EXIT_USAGE and waits == [trainer.cli.OTHER_RANKS_GRACE_S]
    assert capsys.readouterr().err == "error (rank 1): train.global_batch_size=7: not divisible\n"


# ---- the commands, as processes ---------------------------------------------------------------------------


def test_bad_inputs_to_every_command_exit_2_with_one_paragraph_naming_the_key_or_file(tmp_path):
    hf = tiny_llama_dir(tmp_path / "hf")
    damaged = tiny_llama_dir(tmp_path / "damaged")
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a copy cut short
    not_json = bad_jsonl(tmp_path / "not_json.jsonl", [*GOOD[:5], b'{"text": "cut', *GOOD[5:]])
    not_utf8 = bad_jsonl(tmp_path / "latin1.jsonl", [*GOOD[:7], '{"text": "café"}'.encode("latin-1")])
    null_text = bad_jsonl(tmp_path / "null.jsonl", [*GOOD[:3], b'{"text": null}', *GOOD[3:]])
    report_input = tmp_path / "results.json"
    report_input.write_text("perplexity 3.2\n")
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "step_00000004").mkdir(parents=True)
    (run_dir / "checkpoints" / "step_00000004" / "trainer_state.json").write_text("{}")
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "config.yaml").write_text("the config step_00000004 was trained with\n")
    missing = tmp_path / "no" / "such" / "model"
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory\n")
    cases = [
        # (module, args, names the message must hold)
        ("trainer.train", [*DATA, "model.source=foo"], ["model.source=foo", "config, pretrained"]),
        ("trainer.train", [*DATA, "precision=fp9"], ["precision=fp9", "bf16, fp16, fp32, fp8"]),
        ("trainer.train", [*DATA, "train.nokey=1"], ["train.nokey"]),
        ("trainer.train", [*DATA, "train.device=gpu"], ["train.device=gpu", "auto, cpu or cuda"]),
        (
            "trainer.train",
            [*LOOP, "model=hf", f"model.name_or_path={missing}"],
            [f"model.name_or_path={missing}"],
        ),
        ("trainer.train", [*USER_DATA, f"data.data_files={not_json}"], [f"{not_json}, line 6"]),
        (
            "trainer.train",
            [*USER_DATA, f"data.data_files={not_utf8}"],
            [f"{not_utf8}, line 8", "UTF-8"],
        ),
        (
            "trainer.train",
            [*USER_DATA, f"data.data_files={null_text}"],
            [f"{null_text}, line 4", "null"],
        ),
        (
            "trainer.train",
            [*DATA, f"hydra.run.dir={run_dir}"],
            [f"{run_dir} already holds checkpoints", "resume=auto", "resume=none"],
        ),
        ("trainer.export", [str(missing), str(tmp_path / "out")], [str(missing)]),
        ("trainer.export", [str(run_dir), str(tmp_path / "out")], [str(run_dir), "step_00000004"]),
        (
            "trainer.export",
            [f"model_path={missing}", f"output_dir={tmp_path / 'out'}"],
            [f"model_path={missing}"],
        ),
        (
            "trainer.quantize",
            [f"model_path={damaged}", "scheme=int8_dynamic", f"output_dir={tmp_path / 'q'}", "device=cpu"],
            [str(weights), "truncated"],
        ),
        ("trainer.evaluate", [f"models=[{missing}]", "device=cpu", "output=e.json"], [str(missing)]),
        ("trainer.report", [f"input={report_input}", f"output_dir={tmp_path / 'r'}"], [str(report_input)]),
        ("trainer.pipeline", ["chain=compress", "launcher=slurm"], ["launcher=slurm", "fork, subprocess"]),
        (
            "trainer.prepare_data",
            [f"data_files={not_json}", "tokenizer=wordlevel", f"output_dir={tmp_path / 'p1'}"],
            [f"{not_json}, line 6"],
        ),
        (
            "trainer.prepare_data",
            [f"data_files={missing}.jsonl", "tokenizer=wordlevel", f"output_dir={tmp_path / 'p2'}"],
            [f"{missing}.jsonl"],
        ),
        (
            "trainer.prepare_data",
            [f"data_files={not_json}", "tokenizer=wordlevel", "output_dir=o", "num_proc=0"],
            ["num_proc=0"],
        ),
        # No output overwrites its input, and an output that cannot be written is refused before any work.
        (
            "trainer.quantize",
            [f"model_path={hf}", "scheme=int8_dynamic", f"output_dir={hf}", "device=cpu"],
            [f"output_dir={hf} holds the model it reads"],
        ),
        (
            "trainer.quantize",
            [f"model_path={hf}", "scheme=int8_dynamic", f"output_dir={tmp_path}", "device=cpu"],
            [f"output_dir={tmp_path} holds the model it reads ({hf})"],
        ),
        ("trainer.evaluate", [f"models=[{hf}]", "device=cpu", f"output={tmp_path}"], [f"output={tmp_path}"]),
        (
            "trainer.evaluate",
            [f"models=[{hf}]", "device=cpu", f"output={missing}/e.json"],
            [f"output={missing}/e.json", "does not exist"],
        ),
        # An output path that is an existing file, in every command that writes one.
        ("trainer.train", [*DATA, f"hydra.run.dir={a_file}"], [f"hydra.run.dir={a_file}"]),
        (
            "trainer.prepare_data",
            [f"data_files={not_json}", "tokenizer=wordlevel", f"output_dir={a_file}"],
            [f"output_dir={a_file} is a file"],
        ),
        ("trainer.export", [f"model_path={hf}", f"output_dir={a_file}"], [f"output_dir={a_file} is a file"]),
        (
            "trainer.quantize",
            [f"model_path={hf}", "scheme=int8_dynamic", f"output_dir={a_file}", "device=cpu"],
            [f"output_dir={a_file} is a file"],
        ),
        (
            "trainer.report",
            [f"input={report_input}", f"output_dir={a_file}"],
            [f"output_dir={a_file} is a file"],
        ),
        ("trainer.pipeline", ["chain=compress", f"run_dir={a_file}"], [f"run_dir={a_file} is a file"]),
        (
            "trainer.generate",
            [f"model={hf}", "chat=false", "prompt=a", f"output={tmp_path}"],
            [f"output={tmp_path} is a directory"],
        ),
    ]
    # Issue 31's second round: the inputs that still ended in a traceback.
    good = bad_jsonl(tmp_path / "good.jsonl", GOOD)
    not_parquet = bad_jsonl(tmp_path / "data.parquet", GOOD[:3])
    hub_dir = tmp_path / "hub_dataset"  # a dataset directory data.path names, as a hub dataset's files
    hub_dir.mkdir()
    bad_jsonl(hub_dir / "train.json", [*GOOD[:2], '{"text": "café"}'.encode("latin-1")])
    pickled = pickled_model_dir(tmp_path / "pickled", hf)
    no_eos = tokenizer_without_eos(tmp_path / "no_eos")
    checkpoint_of_seq_len(tmp_path / "run32", 32)
    prepare = ["tokenizer=wordlevel", "eval_fraction=0.2"]
    cases += [
        ("trainer.train", [*DATA, f"resume={missing}"], [f"resume={missing}", "no such file"]),
        (
            "trainer.train",
            [*DATA, f"hydra.run.dir={tmp_path / 'run32'}", "resume=auto"],
            ["data.seq_len=16", "data.seq_len=32"],
        ),
        ("trainer.train", [*DATA, "data.markov.num_words=0"], ["error: data.markov.num_words=0"]),
        ("trainer.quantize", ["scheme=int8_dynamic", "output_dir=q"], ["model_path is required"]),
        (
            "trainer.train",
            [*DATA, "model.arch.num_attention_heads=3"],
            ["model.arch.hidden_size=32", "model.arch.num_attention_heads=3"],
        ),
        ("trainer.train", [*DATA, "model.arch.num_key_value_heads=3"], ["model.arch.num_key_value_heads=3"]),
        ("trainer.train", [*DATA, "optimizer.betas=[1.5,0.95]"], ["optimizer.betas=[1.5, 0.95]", "[0, 1)"]),
        ("trainer.train", [*USER_DATA, f"data.path={missing}"], [f"data.path={missing}"]),
        ("trainer.train", [*USER_DATA, f"data.data_files={not_parquet}"], [f"{not_parquet}: not a Parquet"]),
        (
            "trainer.prepare_data",
            [f"data_files={not_parquet}", *prepare, f"output_dir={tmp_path / 'p3'}"],
            [f"{not_parquet}: not a Parquet"],
        ),
        (
            "trainer.prepare_data",
            [f"data_files={good}", f"tokenizer={missing}", f"output_dir={tmp_path / 'p4'}"],
            [f"tokenizer={missing}: no such file"],
        ),
        (
            "trainer.quantize",
            [f"model_path={pickled}", "scheme=int8_dynamic", f"output_dir={tmp_path / 'q'}", "device=cpu"],
            [f"{pickled / 'pytorch_model.bin'}: refused", "could run code"],
        ),
        (
            "trainer.train",
            [*USER_DATA, f"data.path={hub_dir}"],
            [f"{hub_dir / 'train.json'}, line 3", "UTF-8"],
        ),
        ("trainer.train", [*DATA, f"data.tokenizer={no_eos}"], [str(no_eos), "no EOS token"]),
        (
            "trainer.prepare_data",
            [
                f"data_files={good}",
                f"tokenizer={no_eos}",
                "eval_fraction=0.2",
                f"output_dir={tmp_path / 'p5'}",
            ],
            [str(no_eos), "no EOS token"],
        ),
    ]
    if not torch.cuda.is_available():
        cases.append(
            ("trainer.evaluate", [f"models=[{hf}]", "device=cuda", "output=e.json"], ["device=cuda"])
        )
    results = run_commands(tmp_path, [{"module": m, "args": a} for m, a, _ in cases])
    for (module, args, names), result in zip(cases, results, strict=True):
        print(module, args[-1], error_lines(result["output"]))
        assert_explained(result, *names)
    assert a_file.read_text() == "not a directory\n" and (hf / "model.safetensors").is_file()
    # the refused run left the record its checkpoints' export reads as it was
    assert (run_dir / ".hydra" / "config.yaml").read_text() == "the config step_00000004 was trained with\n"
    leftovers = [p for p in tmp_path.rglob("*") if p.name.endswith((".tmp", ".partial"))]
    assert not leftovers, leftovers  # no failed command left a temporary directory


def test_an_error_one_rank_finds_under_torchrun_is_its_paragraph_once_and_no_rank_prints_a_traceback(
    tmp_path,
):
    """Two real 2-rank torchrun jobs at once. A data error: rank 0 reads the data while rank 1 waits at a barrier,
    which fails when rank 0 exits. A config error every rank finds (after the process group is up)."""
    not_json = bad_jsonl(tmp_path / "not_json.jsonl", [*GOOD[:5], b'{"text": "cut', *GOOD[5:]])
    ddp = ["strategy=ddp", "train.micro_batch_size=8", "scheduler.warmup_steps=0"]
    cases = {
        "data": ([*USER_DATA, *ddp, f"data.data_files={not_json}"], f"{not_json}, line 6"),
        "config": (
            [*DATA, *ddp, "model.arch.max_position_embeddings=8"],
            "data.seq_len=16 exceeds the model's maximum of 8 positions",
        ),
    }
    jobs = {}
    for name, (args, _) in cases.items():
        run_dir, logs = tmp_path / name, tmp_path / f"{name}_logs"
        cmd = [
            PYTHON,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_port()),
        ]
        # --redirects: each rank's output in a file of its own under --log-dir, the agent's on the console
        cmd += ["--log-dir", str(logs), "--redirects", "3", "-m", "trainer.train", *args]
        env = subprocess_env() | {"HF_HUB_OFFLINE": "1"}
        env.pop("TRAINER_TRACEBACK", None)
        jobs[name] = subprocess.Popen(
            [*cmd, f"hydra.run.dir={run_dir}"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    for name, (_, message) in cases.items():
        agent = jobs[name].communicate(timeout=300)[0]
        assert jobs[name].returncode != 0, agent[-3000:]
        ranks = {
            int(f.parent.name): f.read_text() + f.with_name("stdout.log").read_text()
            for f in (tmp_path / f"{name}_logs").rglob("stderr.log")
        }
        assert sorted(ranks) == [0, 1], agent[-3000:]
        for rank, output in ranks.items():
            assert not any(line.startswith("Traceback") for line in output.splitlines()), (name, rank, output)
        errors = [
            line for output in ranks.values() for line in output.splitlines() if line.startswith("error")
        ]
        assert len(errors) == 1 and errors[0].startswith("error: ") and message in errors[0], (name, errors)
        assert errors[0] in ranks[0]
        # torchrun's own report: rank 0 exited 2, and rank 1 was ended with it
        assert re.search(r"rank\s*: 0 \(local_rank: 0\)\s*exitcode\s*: 2 ", agent), agent[-3000:]


def test_trainer_traceback_shows_the_traceback(tmp_path):
    args = ["input=/no/such.json", "output_dir=r"]
    cases = [{"module": "trainer.report", "args": args, "env": {"TRAINER_TRACEBACK": "1"}}]
    [result] = run_commands(tmp_path, cases)
    assert result["code"] == 1 and "Traceback" in result["output"]
    assert "InputNotFoundError: input=/no/such.json" in result["output"]


# ---- a run directory is data, not code --------------------------------------------------------------------


def crafted_hub(path: Path, marker: Path) -> Path:
    """A local model whose own code (auto_map) writes `marker` when it is imported."""
    path.mkdir(parents=True)
    write_marker = f"from pathlib import Path\nPath({str(marker)!r}).write_text('the code ran')\n"
    (path / "configuration_marker.py").write_text(
        write_marker
        + textwrap.dedent("""
            from transformers import LlamaConfig

            class MarkerConfig(LlamaConfig):
                model_type = "marker_llm"
            """)
    )
    (path / "modeling_marker.py").write_text(
        write_marker
        + textwrap.dedent("""
            from transformers import LlamaForCausalLM
            from .configuration_marker import MarkerConfig

            class MarkerForCausalLM(LlamaForCausalLM):
                config_class = MarkerConfig
            """)
    )
    config = {
        "model_type": "marker_llm",
        "architectures": ["MarkerForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_marker.MarkerConfig",
            "AutoModelForCausalLM": "modeling_marker.MarkerForCausalLM",
        },
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "vocab_size": 64,
    }
    (path / "config.json").write_text(json.dumps(config))
    return path


def crafted_run(run_dir: Path, hub: Path) -> Path:
    """A run directory whose stored config asks for the hub model's own code; its one checkpoint predates
    checkpoints holding config.json, so the stored config is what describes the model."""
    from trainer.data.tokenizer import build_wordlevel_tokenizer

    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text(
        f"model:\n  source: pretrained\n  name_or_path: {hub}\n  gguf_file: null\n  trust_remote_code: true\n"
        f"data:\n  tokenizer: {hub}\n"
    )
    build_wordlevel_tokenizer(["a b c"]).save_pretrained(str(run_dir / "tokenizer"))
    step = run_dir / "checkpoints" / "step_00000001"
    (step / "shards").mkdir(parents=True)
    (step / "trainer_state.json").write_text("{}")
    return step


def self_describing_checkpoint(step: Path, hub: Path) -> Path:
    """A checkpoint that holds its own config.json (and the code files beside it) asking for that code."""
    import shutil

    from trainer.data.tokenizer import build_wordlevel_tokenizer

    (step / "shards").mkdir(parents=True)
    (step / "trainer_state.json").write_text("{}")
    for f in hub.iterdir():
        shutil.copy(f, step / f.name)
    build_wordlevel_tokenizer(["a b c"]).save_pretrained(str(step))
    return step


def test_no_stored_file_makes_a_command_run_a_models_code(tmp_path):
    marker = tmp_path / "MARKER"
    hub = crafted_hub(tmp_path / "hub", marker)
    old = crafted_run(tmp_path / "run", hub)
    new = self_describing_checkpoint(tmp_path / "run2" / "checkpoints" / "step_00000001", hub)
    out = tmp_path / "out"
    # The control, in the same driver process (its imports paid once): asked for on the command line, the
    # crafted code does run (this test could see it). Its own copy of the hub writes its own marker, so that
    # the cases before it are still checked against an untouched one.
    control_marker = tmp_path / "CONTROL_MARKER"
    control = crafted_run(tmp_path / "control_run", crafted_hub(tmp_path / "control_hub", control_marker))
    cases = [
        ("trainer.export", [str(old), str(out)]),
        ("trainer.export", [str(new), str(out)]),
        ("trainer.export", [f"model_path={new}", f"output_dir={out}", "format=gguf"]),
        ("trainer.export", [f"model_path={hub}", f"output_dir={out}"]),
        ("trainer.quantize", [f"model_path={new}", "scheme=int8_dynamic", f"output_dir={out}", "device=cpu"]),
        ("trainer.evaluate", [f"models=[{new}]", "device=cpu", f"output={out}.json"]),
        ("trainer.evaluate", [f"models=[{hub}]", "device=cpu", f"output={out}.json"]),
    ]
    asked_case = ("trainer.export", [str(control), str(tmp_path / "control_out"), "--trust-remote-code"])
    *results, asked = run_commands(tmp_path, [{"module": m, "args": a} for m, a in [*cases, asked_case]])
    for result in results:
        assert_explained(result, "trust-remote-code")
    assert not marker.exists()
    assert control_marker.read_text() == "the code ran", asked["output"][-2000:]

    # The teacher of a distillation run: the training command's model.trust_remote_code=false holds for a
    # teacher run directory that says true.
    from omegaconf import OmegaConf

    from trainer.distill.teacher import load_teacher

    teacher = OmegaConf.create({"teacher": str(old.parent.parent), "teacher_gguf_file": None})
    with pytest.raises(ConfigError, match="trust-remote-code"):
        load_teacher(teacher, dtype=torch.float32, trust_remote_code=False)
    assert not marker.exists()


# ---- the launch scripts' interpreter ----------------------------------------------------------------------


def test_launch_scripts_use_the_checkouts_venv_when_no_python_is_given_and_say_which(tmp_path):
    import shutil

    checkout = tmp_path / "checkout"
    shutil.copytree(ROOT / "launch", checkout / "launch")
    script = [str(checkout / "launch" / "deepspeed.sh"), "--dry-run"]
    bare = {"PATH": "/usr/bin:/bin"}

    def first_line_and_python(env: dict[str, str]) -> tuple[str, str]:
        proc = subprocess.run(script, capture_output=True, text=True, env=env, check=True)
        return proc.stderr.splitlines()[0], proc.stdout.split()[0]

    line, python = first_line_and_python(bare)
    assert python == "python" and "system's" in line
    venv = checkout / ".venv" / "bin" / "python"
    venv.parent.mkdir(parents=True)
    venv.symlink_to(sys.executable)
    line, python = first_line_and_python(bare)
    assert (
        python == str(venv)
        and line == f"deepspeed.sh: python is {venv} (the checkout's .venv; PYTHON=... picks another)"
    )
    line, python = first_line_and_python(bare | {"VIRTUAL_ENV": "/opt/env"})
    assert python == "python" and "the active environment /opt/env" in line
    line, python = first_line_and_python(bare | {"PYTHON": "/opt/py/bin/python3"})
    assert python == "/opt/py/bin/python3" and line.endswith("(PYTHON)")


def test_the_pipeline_exits_2_when_a_stage_stops_with_an_explained_error(tmp_path, capfd):
    from trainer.pipeline import main

    # dense_adapted alone: the model it fine-tunes, dense_pretrained's hf/ export, is not there.
    args = ["chain=compress", "chain.recipes=tiny", f"run_dir={tmp_path}", "launcher=subprocess"]
    assert main([*args, "only=[dense_adapted]"]) == EXIT_USAGE
    out = capfd.readouterr().out  # the stage's output, teed to this process's stdout
    missing = tmp_path / "dense_pretrained" / "hf"
    assert f"error: model.name_or_path={missing}: no such file or directory" in out
    assert "Traceback" not in out and "stage dense_adapted failed (exit code 2)" in out


def test_a_list_element_holding_equals_is_refused_with_the_quoted_form_that_works():
    """`'train_args=[strategy=fsdp,precision=bf16]'` is not Hydra's grammar: the message gives the form that
    is, and that form (and the example in conf/pipeline.yaml's comment) composes to the list meant."""
    import re
    import shlex

    from trainer.pipeline import compose_pipeline

    with pytest.raises(Exception) as refused:
        compose_pipeline(["chain=compress", "train_args=[strategy=fsdp,precision=bf16]"])
    message = explain(refused.value)
    assert message is not None and "train_args=[strategy=fsdp,precision=bf16]" in message
    [suggested] = re.findall(r'"train_args=[^"]*"', message)
    cfg = compose_pipeline(["chain=compress", *shlex.split(suggested)])  # as the shell passes it
    assert list(cfg.train_args) == ["strategy=fsdp", "precision=bf16"]
    [example] = re.findall(r'"train_args=[^"]*"', (ROOT / "conf" / "pipeline.yaml").read_text())
    cfg = compose_pipeline(["chain=compress", *shlex.split(example)])
    assert list(cfg.train_args) == ["train.device=cuda", "precision=bf16"]


def test_help_lists_each_groups_options_and_none_of_its_registered_schemas():
    """`--help`'s groups: every YAML option of conf/GROUP/ and no ConfigStore schema (`schema`, `schema_nm`...)."""
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.config_store import ConfigStore
    from hydra.core.global_hydra import GlobalHydra

    from trainer.cli import hide_schemas_from_help

    hide_schemas_from_help()
    GlobalHydra.instance().clear()
    try:
        hydra = Hydra.create_main_hydra2("train", create_config_search_path(str(ROOT / "conf")))
        listed = hydra.format_config_groups(lambda group: not group.startswith("hydra/"))
    finally:
        GlobalHydra.instance().clear()
    options = {line.split(": ")[0]: line.split(": ")[1].split(", ") for line in listed.splitlines()}
    for group in ("optimizer", "prune", "scheduler", "strategy", "data", "model"):
        stored = {name.removesuffix(".yaml") for name in ConfigStore.instance().repo[group]}
        schemas = {name for name in stored if name.startswith("schema")}
        assert schemas, group  # the schemas are registered: the check below can fail
        yaml = {path.stem for path in (ROOT / "conf" / group).glob("*.yaml")}
        assert sorted(options[group]) == sorted(yaml), group


def test_an_option_that_does_not_exist_is_refused_naming_the_groups_options_and_no_schema():
    from hydra import compose, initialize_config_dir

    with pytest.raises(Exception) as refused, initialize_config_dir(str(ROOT / "conf"), version_base=None):
        compose("config", overrides=["prune=foo"])
    options = ", ".join(sorted(p.stem for p in (ROOT / "conf" / "prune").glob("*.yaml")))
    assert (
        explain(refused.value) == f"prune=foo: there is no such option; choose one of {options} (conf/prune/)"
    )
