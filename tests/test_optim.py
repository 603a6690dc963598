import math

import pytest
import torch
from torch import nn

from tests.conftest import compose_config
from trainer.config import ConfigError
from trainer.optim import build_optimizer, lr_factor, param_groups


def test_warmup_then_cosine_values_at_chosen_steps():
    f = lambda s: lr_factor(s, name="cosine", warmup_steps=4, decay_steps=14, min_lr_ratio=0.1)  # noqa: E731
    assert f(0) == pytest.approx(1 / 5)
    assert f(3) == pytest.approx(4 / 5)
    assert f(4) == pytest.approx(1.0)
    assert f(9) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the 10 decay steps: cos(pi/2) = 0
    assert f(14) == pytest.approx(0.1)
    assert f(100) == pytest.approx(0.1)  # stays at the floor past the horizon


def test_linear_and_constant_schedules():
    lin = lambda s: lr_factor(s, name="linear", warmup_steps=0, decay_steps=10, min_lr_ratio=0.0)  # noqa: E731
    assert [lin(s) for s in (0, 5, 10)] == pytest.approx([1.0, 0.5, 0.0])
    assert lr_factor(7, name="constant", warmup_steps=2, decay_steps=3, min_lr_ratio=0.0) == 1.0
    assert lr_factor(2, name="cosine", warmup_steps=0, decay_steps=8, min_lr_ratio=0.0) == pytest.approx(
        0.5 * (1 + math.cos(math.pi * 2 / 8))
    )


def test_no_weight_decay_on_biases_norms_and_embeddings():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens = nn.Embedding(10, 4)
            self.proj = nn.Linear(4, 4)
            self.norm = nn.LayerNorm(4)

    m = M()
    decayed, exempt = param_groups(m, weight_decay=0.1, no_decay=["bias", "norm", "embed"])
    assert decayed["weight_decay"] == 0.1 and [id(p) for p in decayed["params"]] == [id(m.proj.weight)]
    assert exempt["weight_decay"] == 0.0 and len(exempt["params"]) == 4


def test_shipped_optimizers_take_a_step():
    for name in ("adamw", "sgd"):
        cfg = compose_config(f"optimizer={name}")
        model = nn.Linear(3, 2)
        opt = build_optimizer(cfg.optimizer, model, device=torch.device("cpu"))
        before = model.weight.detach().clone()
        model(torch.ones(1, 3)).sum().backward()
        opt.step()
        assert not torch.equal(before, model.weight), name


def test_an_argument_the_optimizer_does_not_take_is_named():
    cfg = compose_config("optimizer=sgd", "optimizer._target_=torch.optim.Adagrad")
    with pytest.raises(ConfigError, match="momentum"):
        build_optimizer(cfg.optimizer, nn.Linear(2, 2), device=torch.device("cpu"))


def test_an_unimportable_optimizer_class_is_named():
    cfg = compose_config("optimizer._target_=torch.optim.NoSuchThing")
    with pytest.raises(ConfigError, match="NoSuchThing"):
        build_optimizer(cfg.optimizer, nn.Linear(2, 2), device=torch.device("cpu"))
