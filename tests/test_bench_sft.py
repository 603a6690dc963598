"""bench/sft.py's first result, on a tiny Llama: the same weights on the same conversations give our loss and TRL's
SFTTrainer's (its collator and compute_loss) to 1e-4, packed and not, with the same token ids and trained tokens.
TRL is the reader of its own semantics here (STYLE.md 16); the timing part of the bench is not tested."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from tests.chat_fixtures import saved_smollm2_tokenizer

REPO = Path(__file__).resolve().parents[1]


def load_bench_sft():
    spec = importlib.util.spec_from_file_location("bench_sft", REPO / "bench" / "sft.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_our_loss_equals_trls_on_the_same_conversations_packed_and_not(tmp_path):
    pytest.importorskip("trl", reason="TRL is not installed (pip install trl; the dev extra has it)")
    bench = load_bench_sft()
    from trainer.data.instructions import pydoc_conversations
    from trainer.data.tokenizer import load_tokenizer

    tokenizer_dir = saved_smollm2_tokenizer(tmp_path / "tokenizer")
    tok = load_tokenizer(str(tokenizer_dir))
    system = bench.default_system_prompt(tok)
    assert system  # SmolLM2's template adds one: every conversation gets it explicitly
    rows = bench.with_system(pydoc_conversations()["train"][:6], system)
    jsonl = bench.write_conversations(tmp_path / "conversations.jsonl", rows)
    prepared = bench.prepare_conversations(jsonl, tokenizer_dir, tmp_path / "prepared")
    model_dir = bench.save_model("tiny", tmp_path / "model", vocab_size=len(tok), hidden=32, layers=2, seed=0)
    result = bench.compare_losses(model_dir, tokenizer_dir, prepared, rows, seq_len=512, work=tmp_path)
    assert result["conversations"] == 6
    assert result["token_ids_differ"] == 0 and result["masks_differ"] == 0
    for key in ("unpacked", "packed"):
        r = result[key]
        assert r["ours_trained_tokens"] == r["trl_trained_tokens"] > 0
        assert r["ours"] == pytest.approx(r["trl"], rel=1e-4)
    assert result["agree"]
