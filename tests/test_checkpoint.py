"""Checkpoints: exact resume, crash-safe saves, the model they describe, and the HF export."""

import errno
import json
import re
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from tests.conftest import (
    PYTHON,
    ROOT,
    TINY,
    make_trainer,
    run_command,
    strip_model_description,
    subprocess_env,
)
from trainer.checkpoint import complete_checkpoints, resolve_resume
from trainer.errors import CheckpointError, ConfigError

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


def test_a_run_dir_with_checkpoints_is_refused_untouched_unless_resume_says_continue_or_start_over(tmp_path):
    args = [*TINY, "train.max_steps=2", "train.export_hf=false"]
    make_trainer(tmp_path, *args).train()
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(
        ConfigError, match=rf"{re.escape(str(tmp_path))} already holds checkpoints"
    ) as refused:
        make_trainer(tmp_path, *args)
    assert "resume=auto" in str(refused.value) and "resume=none" in str(refused.value)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert make_trainer(tmp_path, *args, "resume=none").step == 0  # starting over, said explicitly
    assert make_trainer(tmp_path, *args, "resume=auto").step == 2


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


# ---- damaged checkpoints ------------------------------------------------------------------------------

SAVED = [*TINY, "train.max_steps=4", "checkpoint.every_steps=2", "train.export_hf=false"]


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A run with checkpoints at steps 2 and 4, copied fresh for each test that damages one."""
    run = tmp_path_factory.mktemp("saved")
    make_trainer(run, *SAVED).train()
    return run


def _copy(saved_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(saved_run, run)
    return run, run / "checkpoints" / "step_00000004"


def _truncate(file):
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def _flip(file):
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte, inside the tensor data: the size and the header stay valid
    file.write_bytes(bytes(data))


SHARD = "shards/rank_00000.safetensors"
DAMAGES = {
    "truncated shard": (SHARD, _truncate, r"\d+ bytes where \d+ were written \(truncated"),
    "flipped bytes in a shard": (SHARD, _flip, "its xxh3_128 checksum differs from the one recorded at save"),
    "corrupt trainer_state.json": (
        "trainer_state.json",
        lambda f: f.write_text('{"step": 4, "tok'),
        r"\d+ bytes where",
    ),
    "missing shard": (SHARD, lambda f: f.unlink(), r"missing \(the manifest lists it\)"),
    "missing rng file": ("rng/rank_00000.pt", lambda f: f.unlink(), r"missing \(the manifest lists it\)"),
    "missing manifest": ("manifest.json", lambda f: f.unlink(), "missing, though trainer_state.json says"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_resume_auto_passes_over_a_damaged_checkpoint_naming_the_file(damage, saved_run, tmp_path, capsys):
    name, damage_file, why = DAMAGES[damage]
    run, newest = _copy(saved_run, tmp_path)
    damage_file(newest / name)
    capsys.readouterr()
    resumed = make_trainer(run, *SAVED, "train.max_steps=6", "resume=auto")
    said = capsys.readouterr().out
    assert resumed.step == 2 and resumed.resumed_from == run / "checkpoints" / "step_00000002"
    assert re.search(
        rf"step_00000004 is damaged, passing over it: {re.escape(str(newest / name))}: {why}", said
    )
    assert f"resuming from {run / 'checkpoints' / 'step_00000002'}, the newest intact checkpoint" in said
    # The weights are step 2's, read back independently of the trainer's loader.
    saved = load_file(str(run / "checkpoints" / "step_00000002" / SHARD))
    weights = {k: v for k, v in resumed.hf_model.state_dict().items() if f"model/{k}@0" in saved}
    assert len(weights) > 10
    for key, value in weights.items():
        assert torch.equal(value.reshape(-1), saved[f"model/{key}@0"]), key


@pytest.mark.parametrize("damage", ["truncated shard", "flipped bytes in a shard", "missing rng file"])
def test_an_explicit_resume_of_a_damaged_checkpoint_is_an_error_naming_the_file(damage, saved_run, tmp_path):
    name, damage_file, why = DAMAGES[damage]
    run, newest = _copy(saved_run, tmp_path)
    damage_file(newest / name)
    with pytest.raises(
        CheckpointError, match=rf"resume={re.escape(str(newest))}: the checkpoint is damaged: .*{why}"
    ):
        resolve_resume(str(newest), run / "checkpoints")
    with pytest.raises(CheckpointError, match=re.escape(str(newest / name))):
        make_trainer(run, *SAVED, f"resume={newest}")


def test_export_refuses_a_damaged_checkpoint_naming_the_file(saved_run, tmp_path):
    from trainer.export import load_checkpoint_model

    run, newest = _copy(saved_run, tmp_path)
    _flip(newest / SHARD)
    with pytest.raises(
        CheckpointError, match=f"{re.escape(str(newest / SHARD))}: its xxh3_128 checksum differs"
    ):
        load_checkpoint_model(newest, device="cpu")


def test_resume_auto_with_every_checkpoint_damaged_refuses_to_start_afresh(saved_run, tmp_path):
    run, newest = _copy(saved_run, tmp_path)
    _truncate(newest / SHARD)
    _truncate(run / "checkpoints" / "step_00000002" / SHARD)
    with pytest.raises(CheckpointError, match="every checkpoint in .* is damaged .*resume=none"):
        resolve_resume("auto", run / "checkpoints")


def test_a_resume_with_another_seq_len_is_refused_naming_both_lengths(saved_run, tmp_path):
    from trainer.errors import ConfigError

    run, newest = _copy(saved_run, tmp_path)
    expected = f"data.seq_len=16: the checkpoint {newest} was taken with data.seq_len=32"
    with pytest.raises(ConfigError, match=re.escape(expected)):
        make_trainer(run, *SAVED, "data.seq_len=16", "resume=auto")


def test_a_disk_that_fills_during_a_save_names_the_file_and_leaves_the_previous_checkpoint_loadable(
    saved_run, tmp_path, monkeypatch
):
    import errno
    import os

    from trainer import checkpoint

    run, newest = _copy(saved_run, tmp_path)
    real_write = checkpoint.write_shards
    full = []

    def write_until_the_disk_is_full(directory, slices, rank):
        slices = list(slices)
        real_write(directory, slices[: len(slices) // 2], rank=rank)  # part of the file is on disk
        full.append(checkpoint.shard_file(directory, rank))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(full[-1]))

    monkeypatch.setattr(checkpoint, "write_shards", write_until_the_disk_is_full)
    trainer = make_trainer(run, *SAVED, "train.max_steps=6", "resume=auto")
    with pytest.raises(CheckpointError) as refused:
        trainer.train()
    message = str(refused.value)
    assert message.startswith(f"{full[0]}: the disk is full") and "step 6" in message
    assert f"the previous checkpoint, {newest}, is intact" in message
    monkeypatch.undo()
    root = run / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002", "step_00000004"]
    resumed = make_trainer(run, *SAVED, "train.max_steps=6", "resume=auto")
    assert resumed.step == 4
    saved = load_file(str(newest / SHARD))  # read back independently of the trainer's loader
    weights = {k: v for k, v in resumed.hf_model.state_dict().items() if f"model/{k}@0" in saved}
    assert len(weights) > 10
    for key, value in weights.items():
        assert torch.equal(value.reshape(-1), saved[f"model/{key}@0"]), key


def test_a_checkpoint_from_before_manifests_resumes_unverified_and_says_so_once(saved_run, tmp_path, capsys):
    run, newest = _copy(saved_run, tmp_path)
    (newest / "manifest.json").unlink()
    state = json.loads((newest / "trainer_state.json").read_text())
    del state["manifest"]
    (newest / "trainer_state.json").write_text(json.dumps(state))
    capsys.readouterr()
    assert resolve_resume("auto", run / "checkpoints") == newest
    assert resolve_resume("auto", run / "checkpoints") == newest
    resumed = make_trainer(run, *SAVED, "train.max_steps=6", "resume=auto")
    assert resumed.step == 4
    said = capsys.readouterr().out
    note = f"{newest} has no manifest.json (written before checkpoints held checksums): loading it unverified"
    assert said.count(note) == 1, said


def test_the_manifest_records_every_file_with_its_size_and_an_independent_checksum(saved_run):
    import xxhash

    step = saved_run / "checkpoints" / "step_00000004"
    manifest = json.loads((step / "manifest.json").read_text())
    on_disk = {str(p.relative_to(step)) for p in step.rglob("*") if p.is_file()} - {"manifest.json"}
    assert manifest["digest"] == "xxh3_128" and set(manifest["files"]) == on_disk
    for name, entry in manifest["files"].items():
        data = (step / name).read_bytes()
        assert entry == {"bytes": len(data), "checksum": xxhash.xxh3_128(data).hexdigest()}, name


# ---- a checkpoint that is not the model's -------------------------------------------------------------

LAYERS = [o for o in SAVED if not o.startswith("model.arch.num_hidden_layers")]


def test_a_deeper_checkpoint_is_refused_naming_the_tensors_the_model_does_not_take(tmp_path):
    make_trainer(tmp_path, *LAYERS, "model.arch.num_hidden_layers=4", "train.max_steps=2").train()
    with pytest.raises(
        CheckpointError,
        match=r"holds \d+ tensor\(s\) that the model and optimizer do not take: .*model\.layers\.[23]\.",
    ):
        make_trainer(tmp_path, *LAYERS, "model.arch.num_hidden_layers=2", "resume=auto")


def test_a_shallower_checkpoint_is_refused_naming_the_tensors_it_lacks(tmp_path):
    make_trainer(tmp_path, *LAYERS, "model.arch.num_hidden_layers=2", "train.max_steps=2").train()
    with pytest.raises(
        CheckpointError,
        match=r"has no tensor for \d+ name\(s\) the model or optimizer needs: .*model\.layers\.[23]\.",
    ):
        make_trainer(tmp_path, *LAYERS, "model.arch.num_hidden_layers=4", "resume=auto")


# ---- what a kill during keep_last pruning leaves ------------------------------------------------------


def test_leftovers_of_a_kill_during_pruning_are_removed_at_the_next_save(tmp_path):
    keep = [*TINY, "checkpoint.every_steps=1", "checkpoint.keep_last=3", "train.export_hf=false"]
    make_trainer(tmp_path, *keep, "train.max_steps=4").train()
    root = tmp_path / "checkpoints"
    assert [p.name for p in complete_checkpoints(root)] == ["step_00000002", "step_00000003", "step_00000004"]
    # A step directory rmtree stopped half-way through (trainer_state.json already gone), one renamed for
    # deletion, and a save's temporary directory.
    (root / "step_00000001" / "shards").mkdir(parents=True)
    (root / "step_00000001" / "shards" / "rank_00000.safetensors").write_bytes(b"half")
    (root / ".step_00000000.deleting" / "rng").mkdir(parents=True)
    (root / ".step_00000005.tmp" / "shards").mkdir(parents=True)
    make_trainer(tmp_path, *keep, "train.max_steps=5", "resume=auto").train()
    assert sorted(p.name for p in root.iterdir()) == [
        "latest",
        "step_00000003",
        "step_00000004",
        "step_00000005",
    ]
    assert resolve_resume("auto", root) == root / "step_00000005"


def test_keep_last_never_removes_the_checkpoint_just_written(tmp_path):
    every = [*TINY, "checkpoint.every_steps=1", "train.export_hf=false"]
    make_trainer(tmp_path, *every, "train.max_steps=4", "checkpoint.keep_last=0").train()
    root = tmp_path / "checkpoints"
    # Back to step 2 and on to 3: the checkpoints after step 3 are another branch, not counted by keep_last.
    resumed = make_trainer(
        tmp_path, *every, "train.max_steps=3", "checkpoint.keep_last=1", f"resume={root / 'step_00000002'}"
    )
    resumed.train()
    assert [p.name for p in complete_checkpoints(root)] == ["step_00000003", "step_00000004"]
    assert (root / "latest").read_text().strip() == "step_00000003"


def test_two_zero2_ranks_refuse_a_deeper_checkpoint_naming_only_the_tensors_no_rank_takes(tmp_path):
    # ZeRO-2 ranks each read only the optimizer states of their partition: a tensor counts as taken when any
    # rank takes it, so only the deeper layers' tensors are named.
    make_trainer(tmp_path, *LAYERS, "model.arch.num_hidden_layers=4", "train.max_steps=2").train()
    proc = run_command(
        [
            *LAYERS,
            "model.arch.num_hidden_layers=2",
            "strategy=zero2",
            "resume=auto",
            f"hydra.run.dir={tmp_path}",
        ],
        nproc=2,
        check=False,
    )
    assert proc.returncode != 0
    found = re.search(
        r"holds (\d+) tensor\(s\) that the model and optimizer do not take: (.*?); it was", proc.stderr
    )
    assert found, proc.stderr[-3000:]
    named = re.findall(r"(?:model|optim)/model\.layers\.(\d+)\.", found.group(2))
    assert len(named) == 5 and set(named) <= {"2", "3"}, found.group(2)
    # Layers 2 and 3: every weight and its two Adam moments and step (the embeddings and norms are shared).
    reference = load_file(str(tmp_path / "checkpoints" / "step_00000002" / SHARD))
    deeper = {name.rsplit("@", 1)[0] for name in reference if re.search(r"layers\.[23]\.", name)}
    assert int(found.group(1)) == len(deeper)


# ---- a write that fails -------------------------------------------------------------------------------


class FullDisk:
    """A tokenizer or config whose save fails half-way, as on a full disk."""

    def save_pretrained(self, directory) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "half_written.json").write_text("{")
        raise OSError(errno.ENOSPC, "No space left on device")


def test_an_output_whose_writing_fails_leaves_neither_it_nor_a_temporary_directory(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainer.checkpoint import export_hf
    from trainer.data.prepare import write_splits
    from trainer.distributed import ParallelEnv
    from trainer.peft.extension import write_adapter
    from trainer.quant.serialization import save_quantized

    config = LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64
    )
    model = LlamaForCausalLM(config)
    writes = {
        "quantized": lambda out: save_quantized(out, model, {"scheme": "int8_dynamic"}, FullDisk()),
        "hf": lambda out: export_hf(
            out, state_dict=model.state_dict(), hf_model=model, tokenizer=FullDisk(), env=ParallelEnv()
        ),
        "adapter": lambda out: write_adapter(out, {}, FullDisk()),
        "cache": lambda out: write_splits(
            out, {"train": ["a b"], "eval": ["a"]}, FullDisk(), num_proc=1, description={}
        ),
    }
    for name, write in writes.items():
        parent = tmp_path / name
        parent.mkdir()
        with pytest.raises(OSError, match="No space left"):
            write(parent / "out")
        assert list(parent.iterdir()) == [], name
