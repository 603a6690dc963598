"""Prepared datasets: `python -m trainer.prepare_data` -> memmap shards -> `data=tokenized` training, its mixtures,
its resume, and each bad input refused before work."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from tests.conftest import (
    TINY_LOOP,
    TINY_MARKOV,
    TINY_MODEL,
    compose_config,
    make_trainer,
    read_metrics,
    run_command,
    run_with_ctrl_c,
    train_losses,
)
from trainer.config import validate_config
from trainer.data import pack, pad_each
from trainer.data import prepare as prepare_module
from trainer.data.prepare import batch_encoder, is_eval, prepare
from trainer.data.prepared import META_FILE, PROGRESS_FILE, PreparedSplit, ShardWriter, read_meta
from trainer.data.tokenizer import load_tokenizer
from trainer.errors import ConfigError, DataError
from trainer.train import CONF_DIR

WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "sat",
    "on",
    "mat",
    "ran",
    "far",
    "near",
    "big",
    "small",
    "red",
    "blue",
    "green",
    "old",
    "new",
    "quick",
    "slow",
    "happy",
]


def documents(num: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 60)))) for _ in range(num)]


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: t}) + "\n" for t in texts))
    return path


def prepare_config(*overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return compose("prepare_data", overrides=["progress_bar=false", *overrides])


def run_prepare(data_files: Path | str, output_dir: Path, *overrides: str) -> Path:
    args = [
        f"data_files={data_files}",
        f"output_dir={output_dir}",
        "tokenizer=wordlevel",
        "eval_fraction=0.1",
    ]
    return prepare(prepare_config(*args, "shard_tokens=500", *overrides))


def directory_bytes(root: Path) -> dict[str, bytes]:
    skip = ("tokenizer/",)  # the tokenizer's own files are transformers'; its hash is in meta.json
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not str(p.relative_to(root)).startswith(skip)
    }


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("corpus")
    texts = documents(400)
    texts[7] = ""  # an empty document is dropped, as the in-memory path drops it
    write_jsonl(root / "part-0.jsonl", texts[:250])
    write_jsonl(root / "part-1.jsonl", texts[250:])
    return root, texts


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory) -> Path:
    root, _ = corpus
    return run_prepare(root / "*.jsonl", tmp_path_factory.mktemp("prepared") / "ds")


def test_prepare_then_read_gives_the_direct_tokenization_of_each_document_with_eos(corpus, prepared):
    _, texts = corpus
    tok = load_tokenizer(str(prepared / "tokenizer"))
    meta = read_meta(prepared)
    assert meta["dtype"] == "uint16" and meta["tokenizer"]["vocab_size"] == len(tok)
    assert len(meta["splits"]["train"]["shards"]) > 3  # several shards, read as one stream
    for split in ("train", "eval"):
        want = [
            tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            for i, t in enumerate(texts)
            if t and (split == "eval") == is_eval(i, 0.1)
        ]
        reader = PreparedSplit(prepared, split, meta)
        assert reader.num_documents == len(want) == meta["splits"][split]["documents"]
        assert reader.tokens(0, reader.num_tokens).tolist() == [x for d in want for x in d]
        assert [reader.document(d).tolist() for d in range(len(want))] == want
    # The reader's windows are the in-memory path's: packed, and one per document.
    docs = [d[:-1] for d in want]  # eval's, EOS dropped: pack and pad_each append it
    cfg = compose_config("data=tokenized", f"data.path={prepared}", "data.seq_len=16")
    from trainer.data import build_data

    data = build_data(cfg.data, run_dir=prepared)
    everything = torch.arange(len(data.eval))
    packed = pack(docs, 16, tok.eos_token_id)
    assert len(data.eval) == len(packed)
    assert all(
        torch.equal(a, b)
        for a, b in zip(data.eval.batch(everything)[:2], packed.batch(everything)[:2], strict=True)
    )
    cfg.data.packing = False
    data = build_data(cfg.data, run_dir=prepared)
    padded = pad_each(docs, 16, tok.eos_token_id, tok.pad_token_id)
    everything = torch.arange(len(data.eval))
    assert all(
        torch.equal(a, b)
        for a, b in zip(data.eval.batch(everything)[:2], padded.batch(everything)[:2], strict=True)
    )


def test_eval_data_files_are_written_whole_as_the_eval_split(corpus, tmp_path):
    root, texts = corpus
    out = run_prepare(root / "part-0.jsonl", tmp_path / "out", f"eval_data_files={root / 'part-1.jsonl'}")
    tok = load_tokenizer(str(out / "tokenizer"))
    meta = read_meta(out)
    for split, docs in (("train", texts[:250]), ("eval", texts[250:])):
        want = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in docs if t]
        reader = PreparedSplit(out, split, meta)
        assert [reader.document(d).tolist() for d in range(reader.num_documents)] == want
    assert meta["settings"]["eval_fraction"] is None
    assert meta["source"]["eval_data_files"] == [str((root / "part-1.jsonl").resolve())]
    with pytest.raises(ConfigError, match="eval_data_files are local files written as the eval split"):
        prepare(
            prepare_config(
                "path=some/dataset",
                f"eval_data_files={root}",
                f"output_dir={tmp_path / 'x'}",
                "tokenizer=bpe",
            )
        )


@pytest.mark.parametrize("kind", ["bpe", "wordlevel"])
def test_the_batch_encoder_gives_the_ids_of_the_tokenizers_own_call(kind, tmp_path):
    """Even where the saved Rust tokenizer truncates (transformers turns that off for each call) and where the
    text holds a special token's string."""
    from pydoc_data.topics import topics

    from trainer.data.tokenizer import build_bpe_tokenizer, build_wordlevel_tokenizer

    texts = [topics[k] for k in sorted(topics)[:60]]
    tok = build_bpe_tokenizer(texts, 500) if kind == "bpe" else build_wordlevel_tokenizer(texts)
    texts = [*texts, f"two {tok.eos_token} documents", ""]
    want = tok(texts, add_special_tokens=False)["input_ids"]
    tok.backend_tokenizer.enable_truncation(8)
    assert batch_encoder(tok)(texts) == want
    assert tok(texts, add_special_tokens=False)["input_ids"] == want  # and the tokenizer is as it was


def test_two_prepares_are_byte_identical_whatever_the_number_of_processes(corpus, prepared, tmp_path):
    root, _ = corpus
    again = run_prepare(root / "*.jsonl", tmp_path / "again", "num_proc=2", "batch_docs=37")
    assert directory_bytes(again) == directory_bytes(prepared)
    assert not (again / PROGRESS_FILE).exists()


def test_a_prepare_killed_mid_way_continues_where_it_stopped_to_the_same_bytes(
    corpus, prepared, tmp_path, monkeypatch
):
    root, _ = corpus

    class DyingWriter(ShardWriter):
        """Killed half-way through the 17th shard: 16 recorded, one partial file left behind."""

        def add(self, tokens):
            super().add(tokens)
            if self.name == "shard_00016" and len(self.ends) > 3:
                raise KeyboardInterrupt

    monkeypatch.setattr(prepare_module, "ShardWriter", DyingWriter)
    with pytest.raises(KeyboardInterrupt):
        run_prepare(root / "*.jsonl", tmp_path / "ds")
    assert (tmp_path / "ds" / PROGRESS_FILE).is_file() and not (tmp_path / "ds" / META_FILE).exists()
    with pytest.raises(DataError, match="not a prepared dataset .*has not finished"):
        read_meta(tmp_path / "ds")

    progress = json.loads((tmp_path / "ds" / PROGRESS_FILE).read_text())
    done = sum(r["documents"] for s in progress["splits"].values() for r in s["shards"])
    assert done > 200
    assert list((tmp_path / "ds").glob("*/.shard_00016.bin.*.tmp"))  # the partial shard, never recorded
    monkeypatch.setattr(prepare_module, "ShardWriter", ShardWriter)
    encoded = []
    real_encode = prepare_module._encode
    monkeypatch.setattr(prepare_module, "_encode", lambda texts: encoded.extend(texts) or real_encode(texts))
    run_prepare(root / "*.jsonl", tmp_path / "ds")
    assert 0 < len(encoded) <= 400 - done  # the documents of the shards written were not tokenized again
    assert directory_bytes(tmp_path / "ds") == directory_bytes(prepared)


CTRL_C_AFTER_SHARD_5 = """
import trainer.data.prepare as prepare
class ShardWriterThenCtrlC(prepare.ShardWriter):
    def close(self):
        record = super().close()
        if self.name == "shard_00005":
            ctrl_c()
        return record
prepare.ShardWriter = ShardWriterThenCtrlC
"""


def test_ctrl_c_stops_prepare_data_with_one_line_and_the_same_command_continues_to_the_same_bytes(
    corpus, prepared, tmp_path
):
    root, _ = corpus
    out = tmp_path / "ds"
    args = [f"data_files={root / '*.jsonl'}", f"output_dir={out}", "tokenizer=wordlevel", "eval_fraction=0.1"]
    args += ["shard_tokens=500", "progress_bar=false", "num_proc=2"]  # worker processes get the Ctrl-C too
    proc = run_with_ctrl_c("trainer.prepare_data", args, hook=CTRL_C_AFTER_SHARD_5)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 130, output[-3000:]
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output[-3000:]
    assert output.strip().splitlines() == [
        f"interrupted (Ctrl-C): {out} keeps the shards written so far; run the same command again and it "
        "continues where it stopped"
    ]
    assert (out / PROGRESS_FILE).is_file() and not (out / META_FILE).exists()
    run_prepare(root / "*.jsonl", out, "num_proc=2")
    assert directory_bytes(out) == directory_bytes(prepared)


def test_parquet_text_files_and_a_streamed_dataset_directory_give_the_tokens_of_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = documents(60, seed=1)
    tok = (
        f"tokenizer={run_prepare(write_jsonl(tmp_path / 'a.jsonl', texts), tmp_path / 'jsonl') / 'tokenizer'}"
    )
    pq.write_table(pa.table({"text": texts}), tmp_path / "a.parquet", row_group_size=7)
    (tmp_path / "a.txt").write_text("\n".join(texts) + "\n")  # one document per line
    (tmp_path / "hub").mkdir()
    write_jsonl(tmp_path / "hub" / "train.jsonl", texts)
    want = directory_bytes(run_prepare(tmp_path / "a.jsonl", tmp_path / "again", tok))
    for name, source in (
        ("parquet", "data_files=" + str(tmp_path / "a.parquet")),
        ("txt", "data_files=" + str(tmp_path / "a.txt")),
    ):
        out = prepare(
            prepare_config(
                source, f"output_dir={tmp_path / name}", tok, "eval_fraction=0.1", "shard_tokens=500"
            )
        )
        got = directory_bytes(out)
        assert got.keys() == want.keys()
        assert all(got[k] == want[k] for k in got if k != "meta.json"), name
    # A dataset `datasets` loads by path (here a local directory, as a hub name), streamed.
    streamed = prepare(
        prepare_config(
            f"path={tmp_path / 'hub'}",
            "streaming=true",
            f"output_dir={tmp_path / 'hub_out'}",
            tok,
            "eval_fraction=0.1",
            "shard_tokens=500",
        )
    )
    got = directory_bytes(streamed)
    assert all(got[k] == want[k] for k in got if k != "meta.json")
    # A dataset's own eval split, by name, instead of eval_fraction.
    write_jsonl(tmp_path / "hub" / "validation.jsonl", texts[:5])
    named = prepare(
        prepare_config(
            f"path={tmp_path / 'hub'}",
            "eval_split=validation",
            f"output_dir={tmp_path / 'named_split'}",
            tok,
        )
    )
    meta = read_meta(named)
    assert (meta["splits"]["train"]["documents"], meta["splits"]["eval"]["documents"]) == (60, 5)


def test_checking_a_hub_dataset_with_a_named_eval_split_reads_one_record_of_each(monkeypatch):
    read = []

    def texts(self, split):  # a split of a thousand records, each read noted
        for i in range(1000):
            read.append(split)
            yield f"doc {i}"

    monkeypatch.setattr(prepare_module.Source, "_texts", texts)
    cfg = prepare_config("path=some/dataset", "eval_split=validation", "output_dir=o", "tokenizer=bpe")
    prepare_module.Source(cfg).check()
    assert read == ["train", "validation"]


# ---- bad input ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_proc", [1, 3])
def test_a_corrupt_jsonl_line_is_named_by_file_and_line_before_anything_is_written(tmp_path, num_proc):
    """The first bad line of the file, whichever process reads it (3: the file is checked in 12 ranges)."""
    bad = write_jsonl(tmp_path / "bad.jsonl", documents(200))
    lines = bad.read_text().splitlines()
    lines[120] = '{"text": "cut off'
    lines[170] = "not json at all"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"{bad}, line 121: not a JSON line"):
        run_prepare(bad, tmp_path / "out", f"num_proc={num_proc}")
    assert not (tmp_path / "out").exists()


def test_a_missing_text_field_is_named_before_anything_is_written(tmp_path):
    bad = write_jsonl(tmp_path / "docs.jsonl", documents(20), field="body")
    with pytest.raises(DataError, match=rf"{bad}, line 1: no text field 'text' .*\['body'\]"):
        run_prepare(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_empty_input_is_refused_before_anything_is_written(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="empty"):
        run_prepare(tmp_path / "empty.jsonl", tmp_path / "out")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="no documents"):
        run_prepare(tmp_path / "blank.jsonl", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_directory_that_is_not_a_prepared_dataset_is_refused(tmp_path):
    with pytest.raises(DataError, match=rf"data.path={tmp_path}: not a prepared dataset .*no meta.json"):
        make_trainer(tmp_path / "run", *TINY_MODEL, *TINY_LOOP, "data=tokenized", f"data.path={tmp_path}")


def test_a_truncated_shard_is_refused_naming_it(prepared, tmp_path):
    import shutil

    copy = tmp_path / "ds"
    shutil.copytree(prepared, copy)
    shard = copy / "train" / "shard_00001.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(DataError, match=rf"{shard}: \d+ bytes where meta.json and the index say \d+"):
        make_trainer(tmp_path / "run", *TINY_MODEL, *TINY_LOOP, "data=tokenized", f"data.path={copy}")


def test_a_tokenizer_other_than_the_prepared_one_is_refused(corpus, prepared, tmp_path):
    root, _ = corpus
    other = run_prepare(root / "part-1.jsonl", tmp_path / "other")  # another word-level vocabulary
    with pytest.raises(DataError, match=r"data.tokenizer=.*is not the one .* was prepared with"):
        make_trainer(
            tmp_path / "run",
            *TINY_MODEL,
            *TINY_LOOP,
            "data=tokenized",
            f"data.path={prepared}",
            f"data.tokenizer={other / 'tokenizer'}",
        )
    # Prepared with a named tokenizer (a directory, as a model's), training that names it is accepted.
    named = run_prepare(root / "part-0.jsonl", tmp_path / "named", f"tokenizer={other / 'tokenizer'}")
    trainer = make_trainer(
        tmp_path / "ok",
        *TINY_MODEL,
        *TINY_LOOP,
        "data=tokenized",
        f"data.path={named}",
        f"data.tokenizer={other / 'tokenizer'}",
    )
    assert len(trainer.data.tokenizer) == read_meta(named)["tokenizer"]["vocab_size"]
    with pytest.raises(DataError, match="prepared with another tokenizer"):
        make_trainer(
            tmp_path / "run",
            *TINY_MODEL,
            *TINY_LOOP,
            "data=tokenized",
            f"data.sources=[{{path: {prepared}, weight: 1}}, {{path: {other}, weight: 1}}]",
        )


@pytest.mark.parametrize(
    "weights, message",
    [
        ("-0.5, 1", r"data.sources\[0\].weight=-0.5: must be a finite number >= 0"),
        ("0, 0", "every weight is 0"),
    ],
)
def test_bad_weights_are_refused_naming_the_key(weights, message):
    a, b = weights.split(", ")
    cfg = compose_config(
        "data=tokenized", f"data.sources=[{{path: A, weight: {a}}}, {{path: B, weight: {b}}}]"
    )
    with pytest.raises(ConfigError, match=message):
        validate_config(cfg)


# ---- training ----------------------------------------------------------------------------------------------

TRAIN = [*TINY_MODEL, *TINY_LOOP, "data=tokenized", "scheduler=constant", "train.export_hf=false"]


class RecordingOrder:
    """An order that records the global sample ids of each step taken (not those the prefetcher peeks at)."""

    def __init__(self, order) -> None:
        self.order, self.taken = order, []

    def take(self, count: int) -> torch.Tensor:
        ids = self.order.take(count)
        self.taken.append(ids.tolist())
        return ids

    def __getattr__(self, name: str):
        return getattr(self.order, name)


def _recording_order(trainer) -> list[list[int]]:
    trainer.order = RecordingOrder(trainer.order)
    return trainer.order.taken


def test_resume_continues_with_exactly_the_next_samples_and_losses(prepared, tmp_path):
    mixture = [f"data.sources=[{{path: {prepared}, weight: 0.7}}, {{path: {prepared}, weight: 0.3}}]"]
    common = [*TRAIN, *mixture, "train.log_every=1", "scheduler.decay_steps=20"]
    straight = make_trainer(tmp_path / "a", *common, "train.max_steps=20")
    want = _recording_order(straight)
    straight.train()
    make_trainer(tmp_path / "b", *common, "train.max_steps=10").train()
    resumed = make_trainer(tmp_path / "b", *common, "train.max_steps=20", "resume=auto")
    assert resumed.order.consumed == 10 * 8
    got = _recording_order(resumed)
    resumed.train()
    assert got == want[10:]
    a, b = train_losses(tmp_path / "a"), train_losses(tmp_path / "b")
    assert [b[s] for s in range(1, 21)] == [a[s] for s in range(1, 21)]
    waits = [r["data_wait_s"] for r in read_metrics(tmp_path / "a") if "loss" in r]
    assert len(waits) == 20 and all(0 <= w < 1 for w in waits)


def test_resume_with_other_weights_is_refused_naming_them_unless_allowed(prepared, tmp_path, capsys):
    before = [f"data.sources=[{{path: {prepared}, weight: 0.5}}, {{path: {prepared}, weight: 0.5}}]"]
    after = [f"data.sources=[{{path: {prepared}, weight: 0.8}}, {{path: {prepared}, weight: 0.2}}]"]
    make_trainer(tmp_path, *TRAIN, *before, "train.max_steps=2").train()
    with pytest.raises(DataError, match=r"source 0's weight was 0.5, now 0.8.*data.allow_changed=true"):
        make_trainer(tmp_path, *TRAIN, *after, "train.max_steps=4", "resume=auto")
    with pytest.raises(DataError, match="seq_len was 32, now 16"):
        make_trainer(tmp_path, *TRAIN, *before, "data.seq_len=16", "train.max_steps=4", "resume=auto")
    resumed = make_trainer(
        tmp_path, *TRAIN, *after, "data.allow_changed=true", "train.max_steps=4", "resume=auto"
    )
    assert resumed.order.consumed == 16
    assert "continues on the new data from its global sample 16" in capsys.readouterr().out


def test_resume_on_two_ddp_ranks_continues_the_single_process_run(prepared, tmp_path):
    common = [*TRAIN, f"data.path={prepared}", "train.log_every=1", "train.max_steps=8"]
    run_command([*common, f"hydra.run.dir={tmp_path / 'straight'}"])
    half = [*common, "checkpoint.every_steps=4", f"hydra.run.dir={tmp_path / 'b'}"]
    run_command([*half, "train.max_steps=4"])
    run_command([*half, "strategy=ddp", "resume=auto"], nproc=2)
    want, got = train_losses(tmp_path / "straight"), train_losses(tmp_path / "b")
    for step in range(1, 9):
        assert got[step] == pytest.approx(want[step], rel=1e-4), (step, want, got)


# ---- one path for every source -----------------------------------------------------------------------------

# The first step's loss of each preset on the in-memory path, before the presets went through prepared datasets
# (commit 8ebdcd1, this test's settings): the model sees the same tokens in the same order.
FIRST_STEP_LOSS_BEFORE = {
    "embedded": 4.851063251495361,
    "embedded, packing=false": 4.858948707580566,
    "pydoc": 6.250010967254639,
}
PRESETS = {
    "embedded": [*TINY_MODEL, *TINY_LOOP, *TINY_MARKOV],
    "embedded, packing=false": [*TINY_MODEL, *TINY_LOOP, *TINY_MARKOV, "data.packing=false"],
    "pydoc": [*TINY_MODEL, *TINY_LOOP, "data=pydoc", "data.tokenizer_vocab_size=512", "data.seq_len=32"],
}


@pytest.mark.parametrize("preset", list(PRESETS))
def test_the_presets_read_through_a_prepared_cache_give_the_first_step_loss_of_before(preset, tmp_path):
    from trainer.data.loading import load_splits, tokenize

    trainer = make_trainer(tmp_path, *PRESETS[preset], "train.max_steps=1")
    data, cfg = trainer.data, trainer.cfg.data
    assert list((tmp_path / "data").glob("prepared-*/meta.json"))  # the cache, in the run directory
    # Every window is the in-memory path's (tokenized with datasets.map, packed or padded in memory).
    train, _, _ = load_splits(cfg, tmp_path / "data")
    docs = tokenize(train, data.tokenizer, cfg.text_field, 1)
    tok = data.tokenizer
    before = (
        pack(docs, cfg.seq_len, tok.eos_token_id)
        if cfg.packing
        else pad_each(docs, cfg.seq_len, tok.eos_token_id, tok.pad_token_id)
    )
    everything = torch.arange(len(before))
    assert len(data.train) == len(before)
    assert all(
        torch.equal(a, b)
        for a, b in zip(data.train.batch(everything)[:2], before.batch(everything)[:2], strict=True)
    )
    assert trainer.train_step()["loss"] == pytest.approx(FIRST_STEP_LOSS_BEFORE[preset], rel=1e-5)


def test_a_built_tokenizer_beside_a_qwen2_config_reloads_with_its_own_ids(tmp_path):
    # transformers would load it as Qwen2's own tokenizer class (its split and NFC) because config.json names
    # qwen2: every checkpoint and export of such a run would tokenize differently from its training.
    from pydoc_data.topics import topics

    from transformers import AutoConfig

    from trainer.data.tokenizer import build_bpe_tokenizer

    texts = [topics[k] for k in sorted(topics)[:20]]
    built = build_bpe_tokenizer(texts, vocab_size=400)
    built.save_pretrained(tmp_path)
    AutoConfig.for_model("qwen2", vocab_size=448).save_pretrained(tmp_path)
    reloaded = load_tokenizer(str(tmp_path))
    assert [reloaded(t)["input_ids"] for t in texts] == [built(t)["input_ids"] for t in texts]
