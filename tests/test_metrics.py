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
