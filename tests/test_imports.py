"""What each command imports: evaluating or quantizing a model (a checkpoint included) runs no distillation,
pruning or adapter code, since a checkpoint describes its model itself."""

import json
import subprocess
import textwrap

import pytest

from tests.conftest import PYTHON, ROOT, TINY, TINY_MARKOV, make_trainer, subprocess_env

DATA = [*TINY_MARKOV, "data.seq_len=32"]

# Runs `python -m MODULE ARGS` in this process, then prints the feature packages that got imported.
RUN_AND_LIST = textwrap.dedent(
    """
    import json, runpy, sys

    module, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    features = ("trainer.distill", "trainer.prune", "trainer.peft")
    loaded = sorted(m for m in sys.modules if any(m == f or m.startswith(f + ".") for f in features))
    print("IMPORTED " + json.dumps(loaded))
    """
)


def imported_features(module: str, *args: str) -> list[str]:
    proc = subprocess.run(
        [PYTHON, "-c", RUN_AND_LIST, module, *args],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [line] = [line for line in proc.stdout.splitlines() if line.startswith("IMPORTED ")]
    return json.loads(line.removeprefix("IMPORTED "))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny model trained for two steps: its checkpoint (and the run's hf/ export beside it)."""
    run = tmp_path_factory.mktemp("run")
    make_trainer(run, *TINY, "train.max_steps=2").train()
    return run / "checkpoints" / "step_00000002"


def test_quantizing_and_evaluating_a_checkpoint_import_no_distillation_or_pruning_code(checkpoint, tmp_path):
    quantized = tmp_path / "int8"
    # int8_smooth with GPTQ: the layer-by-layer calibration pruning shares, on the checkpoint exported on the fly.
    args = ["scheme=int8_smooth", "smooth.gptq=true", "smooth.calibration_batches=1", "smooth.batch_size=2"]
    got = imported_features(
        "trainer.quantize", f"model_path={checkpoint}", *args, f"output_dir={quantized}", *DATA
    )
    assert got == []
    assert (quantized / "config.json").is_file()

    output = tmp_path / "eval.json"
    latency = ["latency.prefill_len=8", "latency.decode_tokens=2", "latency.repeats=1", "latency.warmup=0"]
    got = imported_features(
        "trainer.evaluate",
        f"models=[{checkpoint},{quantized}]",
        f"output={output}",
        "eval_batches=1",
        *latency,
        *DATA,
    )
    assert got == []
    assert [e["scheme"] for e in json.loads(output.read_text())] == ["float", "int8_smooth"]


def test_exporting_a_checkpoint_imports_no_distillation_or_pruning_code(checkpoint, tmp_path):
    got = imported_features("trainer.export", f"model_path={checkpoint}", f"output_dir={tmp_path / 'hf'}")
    assert got == []
    assert (tmp_path / "hf" / "config.json").is_file()
