"""Configs that cannot mean what they say are refused (or warned about) before any work, naming our key."""

from __future__ import annotations

import warnings

import pytest

from tests.conftest import TINY, compose_config
from trainer.config import check_known_keys, validate_config
from trainer.errors import ConfigError, InputNotFoundError
from trainer.models import build_model


@pytest.mark.parametrize("lr", ["inf", "-inf", "nan"])
def test_a_learning_rate_that_is_not_finite_is_refused(lr):
    with pytest.raises(ConfigError, match=r"optimizer\.lr=.*finite"):
        validate_config(compose_config(*TINY, f"optimizer.lr={lr}"))


def test_a_warmup_longer_than_the_run_warns():
    with pytest.warns(
        UserWarning, match=r"scheduler\.warmup_steps=20 is longer than the run \(train\.max_steps=6\)"
    ):
        validate_config(compose_config(*TINY, "scheduler.warmup_steps=20"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warmup within the run: no warning
        validate_config(compose_config(*TINY, "scheduler.warmup_steps=6"))


@pytest.mark.parametrize(
    "override", ["+train.nosuch=1", "+nosuch=1", "+optimizer.betas2=[0.9]", "+logger.wandb.x=1"]
)
def test_an_unknown_key_added_with_plus_is_refused(override):
    key = override[1:].split("=")[0]
    with pytest.raises(ConfigError, match=rf"^{key}: no such key"):
        validate_config(compose_config(*TINY, override))


@pytest.mark.parametrize(
    "override",
    [
        "+model.arch.attention_dropout=0.1",
        "+data.markov.extra=1",
        "+strategy.deepspeed.gradient_clipping=1.0",
        "+prune.layer_sparsity.lm_head=0.5",
    ],
)
def test_a_key_added_under_a_free_form_field_is_accepted(override):
    cfg = compose_config(*TINY, override)
    check_known_keys(cfg)
    if override.startswith("+model.arch"):
        validate_config(cfg)
        assert build_model(cfg.model, vocab_size=64).config.attention_dropout == 0.1


def test_an_unknown_model_type_names_the_key():
    cfg = compose_config(*TINY, "model.arch.model_type=nosuch")
    with pytest.raises(ConfigError, match=r"^model\.arch\.model_type=nosuch: "):
        build_model(cfg.model, vocab_size=64)


def test_an_architecture_transformers_cannot_build_names_the_key():
    cfg = compose_config(*TINY, "+model.arch.hidden_act=nosuch")
    with pytest.raises(ConfigError, match=r"^model\.arch \(model_type=llama\): .*nosuch"):
        build_model(cfg.model, vocab_size=64)


def test_a_default_pad_id_outside_a_small_vocabulary_names_the_override_that_fixes_it():
    cfg = compose_config(*TINY, "model.arch.model_type=phi3")  # Phi3Config's pad_token_id is 32000
    with pytest.raises(
        ConfigError, match=r"pad_token_id=32000 \(the default of .*Phi3Config\) .* 64 ids; set \+model"
    ):
        build_model(cfg.model, vocab_size=64)
    fixed = build_model(
        compose_config(*TINY, "model.arch.model_type=phi3", "+model.arch.pad_token_id=0").model, vocab_size=64
    )
    assert fixed.get_input_embeddings().padding_idx == 0


def test_a_missing_model_path_names_the_key(tmp_path):
    cfg = compose_config(*TINY, f"model.name_or_path={tmp_path / 'absent'}")
    # A path that names nothing is refused before transformers takes it for a hub name (trainer.utils.loading_from).
    with pytest.raises(InputNotFoundError, match=r"^model\.name_or_path=.*absent: no such file or directory"):
        build_model(cfg.model, vocab_size=64)
