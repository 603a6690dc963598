import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from trainer.metrics import mfu
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
