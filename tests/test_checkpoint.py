"""Checkpoints: exact resume, crash-safe saves, the model they describe, and the HF export."""

import json
import shutil
import subprocess
import textwrap

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from tests.conftest import PYTHON, ROOT, TINY, make_trainer, strip_model_description, subprocess_env
from trainer.checkpoint import complete_checkpoints, resolve_resume

EXACT = [*TINY, "scheduler=constant", "optimizer.weight_decay=0.1", "train.export_hf=false"]


def _weights(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.hf_model.state_dict().items()}


def test_resume_is_bitwise_identical_to_a_straight_run(tmp_path):
    straight = make_trainer(tmp_path / "a", *EXACT, "train.max_steps=20")
    straight.train()
    first = make_trainer(tmp_path / "b", *EXACT, "train.max_steps=10")
    first.train()
    resumed = make_trainer(tmp_path / "b", *EXACT, "train.max_steps=20", "resume=auto")
    assert resumed.step == 10 and resumed.order.consumed == 10 * 8
    resumed.train()
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the straight run"
    # The optimizer moments too.
    sa, sb = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)


def test_resume_auto_without_a_checkpoint_starts_fresh(tmp_path):
    trainer = make_trainer(tmp_path, *TINY, "resume=auto")
    assert trainer.step == 0 and trainer.resumed_from is None


KILL_DURING_SAVE = textwrap.dedent(
    """
    import os, signal, sys
    from trainer import checkpoint
    from tests.conftest import make_trainer, TINY

    real_write = checkpoint.write_shards
    calls = []

    def write_then_die(directory, slices, rank):
        calls.append(directory)
        slices = list(slices)
        if len(calls) == 2:  # the second save: write part of the shards, then the process is killed
            real_write(directory, slices[: len(slices) // 2], rank=rank)
            os.kill(os.getpid(), signal.SIGKILL)
        return real_write(directory, slices, rank=rank)

    checkpoint.write_shards = write_then_die
    make_trainer(sys.argv[1], *TINY, "train.max_steps=4", "checkpoint.every_steps=2").train()
    """
)


def test_a_save_killed_half_way_leaves_the_previous_checkpoint_loadable(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.run(
        [PYTHON, "-c", KILL_DURING_SAVE, str(run)],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    root = run / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_00000002"
    assert (root / ".step_00000004.tmp").is_dir()  # the half-written one, under its temporary name
    assert [p.name for p in complete_checkpoints(root)] == ["step_00000002"]
    assert resolve_resume("auto", root) == root / "step_00000002"
    resumed = make_trainer(run, *TINY, "train.max_steps=4", "checkpoint.every_steps=2", "resume=auto")
    assert resumed.step == 2
    resumed.train()
    assert (root / "latest").read_text().strip() == "step_00000004"
    assert not (root / ".step_00000004.tmp").exists()


def test_keep_last_prunes_old_checkpoints(tmp_path):
    make_trainer(
        tmp_path, *TINY, "train.max_steps=6", "checkpoint.every_steps=1", "checkpoint.keep_last=2"
    ).train()
    assert [p.name for p in complete_checkpoints(tmp_path / "checkpoints")] == [
        "step_00000005",
        "step_00000006",
    ]


def test_hf_export_reloads_with_the_same_logits(tmp_path):
    trainer = make_trainer(tmp_path, *TINY)
    trainer.train()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) >= 1
    text = " ".join(trainer.data.tokenizer.convert_ids_to_tokens(list(range(3, 13))))
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    assert ids.shape[1] == 10
    trainer.hf_model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, trainer.hf_model(ids).logits)


def test_an_atomic_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path):
    from trainer.utils import write_atomic, write_json_atomic

    target = tmp_path / "sub" / "state.json"
    write_json_atomic(target, {"step": 1})
    with pytest.raises(TypeError):
        write_atomic(target, 123)  # fails inside the write, after the temporary file was opened
    assert json.loads(target.read_text()) == {"step": 1}
    assert [p.name for p in target.parent.iterdir()] == ["state.json"]


def test_a_checkpoint_describes_its_model_and_loads_without_the_run_config(tmp_path):
    from trainer.export import load_checkpoint_model

    overrides = [*TINY, "train.max_steps=2"]
    trainer = make_trainer(tmp_path, *overrides)
    trainer.train()
    step = tmp_path / "checkpoints" / "step_00000002"
    assert not (tmp_path / ".hydra").exists()  # a run in this process: no resolved config to fall back on
    # transformers' own readers take the checkpoint directory; the cache is off for training only (and the
    # hf/ export, written after the checkpoint, added `architectures` to the live config).
    saved = AutoConfig.from_pretrained(step).to_diff_dict()
    trained = trainer.hf_model.config.to_diff_dict()
    trained.pop("architectures")
    assert saved.pop("use_cache") is True and trained.pop("use_cache") is False and saved == trained
    assert AutoTokenizer.from_pretrained(step).get_vocab() == trainer.data.tokenizer.get_vocab()

    ids = torch.randint(3, 60, (2, 12), generator=torch.Generator().manual_seed(0))
    trainer.hf_model.eval()
    with torch.no_grad():
        want = trainer.hf_model(ids).logits
        model, tokenizer = load_checkpoint_model(step, device="cpu")
        assert torch.equal(model(ids).logits, want)
        assert tokenizer.get_vocab() == trainer.data.tokenizer.get_vocab()

        # Written before checkpoints held these files: rebuilt from the run's resolved config, the same model.
        strip_model_description(step, overrides)
        old, _ = load_checkpoint_model(step, device="cpu")
        assert torch.equal(old(ids).logits, want)
    shutil.rmtree(tmp_path / ".hydra")
    with pytest.raises(FileNotFoundError, match="has no config.json .* pass --run-dir"):
        load_checkpoint_model(step)
