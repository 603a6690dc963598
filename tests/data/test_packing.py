import json

import torch

from tests.conftest import compose_config
from trainer.data import IGNORE_INDEX, pack, pad_each
from trainer.data.loading import load_splits


def test_packing_keeps_every_token_once_and_predicts_the_next():
    docs = [[5, 6, 7], [8], [9, 10, 11, 12, 13], [14, 15]]
    eos = 1
    w = pack(docs, seq_len=4, eos_id=eos)
    stream = [5, 6, 7, 1, 8, 1, 9, 10, 11, 12, 13, 1, 14, 15, 1]  # 15 tokens -> (15 - 1) // 4 = 3 windows
    assert w.inputs.tolist() == [stream[0:4], stream[4:8], stream[8:12]]
    assert w.labels.tolist() == [stream[1:5], stream[5:9], stream[9:13]]
    # Inputs cover the stream once, in order, with no padding.
    assert w.inputs.flatten().tolist() == stream[:12]


def test_padding_each_document_ignores_the_padding():
    w = pad_each([[5, 6], [7, 8, 9, 10, 11, 12]], seq_len=4, eos_id=1, pad_id=0)
    assert w.inputs.tolist() == [[5, 6, 0, 0], [7, 8, 9, 10]]
    assert w.labels.tolist() == [[6, 1, IGNORE_INDEX, IGNORE_INDEX], [8, 9, 10, 11]]


def test_held_out_split_does_not_overlap_train(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"body": f"document number {i}"}) + "\n" for i in range(200)))
    cfg = compose_config(
        "data=hf", f"data.data_files={path}", "data.text_field=body", "data.eval_fraction=0.1"
    )
    train, evals, floor = load_splits(cfg.data, tmp_path)
    train_docs, eval_docs = set(train["body"]), set(evals["body"])
    assert floor is None
    assert len(eval_docs) == 20 and not train_docs & eval_docs
    assert len(train_docs | eval_docs) == 200


def test_embedded_train_and_eval_windows_are_built_from_their_own_files(tmp_path, tiny_overrides):
    from trainer.data import build_data

    cfg = compose_config(*tiny_overrides)
    data = build_data(cfg.data, run_dir=tmp_path)
    assert len(data.train) > len(data.eval) > 0
    batch = data.train.batch(torch.arange(len(data.train)))
    inputs, labels = batch.inputs, batch.labels
    assert inputs.shape[1] == cfg.data.seq_len
    assert torch.equal(inputs[:, 1:], labels[:, :-1])
    assert 0 < data.entropy_floor < 5


def test_wordlevel_tokenizer_maps_each_word_to_one_token(tmp_path, tiny_overrides):
    from trainer.data import build_data

    data = build_data(compose_config(*tiny_overrides).data, run_dir=tmp_path)
    text = (tmp_path / "data").rglob("train.jsonl").__next__().read_text().splitlines()[0]
    words = json.loads(text)["text"].split()
    ids = data.tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]
    assert len(ids) == len(words) and data.tokenizer.unk_token_id not in ids
