import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from trainer.metrics import gpu_peak_flops, mfu
from trainer.models import flops_per_token


def test_flops_per_token_against_a_hand_count():
    d, ff, layers, heads, vocab, seq = 16, 48, 2, 4, 100, 32
    model = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=d,
            intermediate_size=ff,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=2,
            vocab_size=vocab,
            tie_word_embeddings=False,
        )
    )
    kv = 2 * (d // heads)
    per_layer = d * d + 2 * d * kv + d * d + 3 * d * ff + 2 * d  # q, k, v, o, gate/up/down, two norms
    matmul_params = layers * per_layer + d + vocab * d  # + final norm + LM head (embedding excluded)
    expected = 6 * matmul_params + 12 * layers * d * seq
    assert flops_per_token(model, seq) == expected


def test_tied_head_still_counts_as_a_matmul():
    cfg = dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64
    )
    tied = LlamaForCausalLM(LlamaConfig(**cfg, tie_word_embeddings=True))
    untied = LlamaForCausalLM(LlamaConfig(**cfg, tie_word_embeddings=False))
    assert flops_per_token(tied, 8) == flops_per_token(untied, 8)


def test_mfu_is_achieved_over_peak():
    assert mfu(tokens_per_s=1000, flops_per_token=6e6, peak=1e10, num_devices=2) == pytest.approx(0.3)


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),  # the PCIe card, not its SXM sibling
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA L4", 121e12),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_a_gpu_peak_comes_from_its_name_and_an_unknown_gpu_has_none(name, peak):
    assert gpu_peak_flops(name) == peak


def test_an_unknown_peak_reports_no_mfu_and_the_run_trains_and_says_so(tmp_path, monkeypatch, capsys):
    """A GPU missing from the table (here: the CPU probe answering None) must not stop a run."""
    import json

    import trainer.loop
    from tests.conftest import TINY, make_trainer

    monkeypatch.setattr(trainer.loop, "peak_flops", lambda device, configured: None)
    summary = make_trainer(tmp_path, *TINY, "train.max_steps=2", "train.log_every=1").train()
    assert summary["mfu"] is None and summary["steps"] == 2
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["mfu"] for r in records if "loss" in r] == [None, None]
    out = capsys.readouterr().out
    assert "peak unknown (no MFU)" in out and "MFU not reported" in out
    assert mfu(tokens_per_s=1000, flops_per_token=6e6, peak=None, num_devices=2) is None


def test_tokens_per_s_and_mfu_count_no_padding_and_a_mostly_padded_run_says_so(tmp_path, capsys):
    """data.packing=false on documents of ~4 words in windows of 64 tokens: tokens/s and MFU count the input
    tokens that are not padding (a hand count over the windows each step took), and the run warns, with the
    padding's share, at its first step. Output is not a terminal here: no bar frames, a plain line per step."""
    import json
    import re

    from tests.conftest import TINY, make_trainer
    from trainer.errors import TrainerWarning

    seq_len, batch, steps = 64, 8, 3
    overrides = ["data.packing=false", f"data.seq_len={seq_len}", "data.markov.mean_doc_words=4"]
    loop = [
        f"train.max_steps={steps}",
        "train.log_every=1",
        "train.eval_batches=1",
        "train.progress_bar=true",
    ]
    loop += ["checkpoint.at_end=false", "train.export_hf=false"]
    trainer = make_trainer(tmp_path, *TINY, *overrides, *loop)
    with pytest.warns(TrainerWarning) as warned:
        summary = trainer.train()

    # The hand count: the windows of each step, taken in the run's order, their tokens other than the pad id.
    windows, tokenizer = trainer.data.train, trainer.data.tokenizer
    assert tokenizer.pad_token_id not in (tokenizer.eos_token_id, tokenizer.unk_token_id)
    order = windows.order(seed=trainer.cfg.train.seed)
    real = [
        int((windows.batch(order.take(batch)).inputs != tokenizer.pad_token_id).sum()) for _ in range(steps)
    ]
    slots = batch * seq_len
    assert 0 < max(real) < slots / 2
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "loss" in r]
    assert [r["real_tokens"] for r in records] == real
    assert [r["padding_fraction"] for r in records] == pytest.approx([1 - n / slots for n in real])
    assert summary["tokens_per_s"] * summary["seconds"] == pytest.approx(sum(real))
    assert summary["mfu"] == pytest.approx(summary["tokens_per_s"] * trainer.flops_per_token / trainer.peak)

    padding = [str(w.message) for w in warned if "padding is" in str(w.message)]
    assert len(padding) == 1
    assert f"padding is {100 * (1 - real[0] / slots):.1f}% of the input tokens of step 1" in padding[0]
    assert "data.packing=true" in padding[0] and "data.seq_len" in padding[0]

    captured = capsys.readouterr()
    assert "train:" not in captured.err + captured.out  # no frame of the loop's bar
    lines = [line for line in captured.out.splitlines() if line.startswith("step ")]
    assert len(lines) == steps
    for line, r in zip(lines, records, strict=True):
        assert line.startswith(f"step {r['step']}/{steps}: loss {r['loss']:.4f}, lr {r['lr']:.3g}, ")
        assert re.search(r", [\d,]+ tokens/s, MFU \d+\.\d%, ETA \d+:\d\d:\d\d$", line), line
    assert lines[-1].endswith("ETA 0:00:00")
