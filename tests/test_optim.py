import math
import os

import pytest
import torch
from torch import nn

from tests.conftest import compose_config, composition_error
from trainer.config import validate_config
from trainer.errors import ConfigError
from trainer.optim import build_optimizer, lr_factor, param_groups, schedule_factor


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


def test_wsd_holds_the_peak_then_decays_over_the_last_fraction():
    def f(step, shape):
        return lr_factor(
            step,
            name="wsd",
            warmup_steps=4,
            decay_steps=20,
            min_lr_ratio=0.1,
            decay_fraction=0.25,
            decay_shape=shape,
        )

    # Warmup to step 4, the peak until 20 x (1 - 0.25) = 15, the decay over steps 15..20, then the floor.
    assert f(0, "linear") == pytest.approx(1 / 5) and f(3, "linear") == pytest.approx(4 / 5)
    assert [f(s, "linear") for s in (4, 10, 14, 15)] == [1.0, 1.0, 1.0, 1.0]
    assert f(17, "linear") == pytest.approx(0.1 + 0.9 * (1 - 2 / 5))  # 0.64
    assert f(17, "cosine") == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 2 / 5)))  # 0.68906
    assert f(16, "1-sqrt") == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(1 / 5)))  # 0.59751
    assert f(19, "1-sqrt") == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(4 / 5)))  # 0.19502
    assert f(20, "1-sqrt") == pytest.approx(0.1) and f(50, "cosine") == pytest.approx(0.1)


def test_wsd_decaying_over_the_whole_horizon_is_the_linear_schedule():
    wsd = dict(name="wsd", decay_fraction=1.0, decay_shape="linear")
    common = dict(warmup_steps=3, decay_steps=12, min_lr_ratio=0.2)
    for step in range(16):  # the decay cannot start before warmup ends
        assert lr_factor(step, **wsd, **common) == pytest.approx(lr_factor(step, name="linear", **common))


def test_wsd_from_the_shipped_config():
    cfg = compose_config("scheduler=wsd", "scheduler.warmup_steps=0", "scheduler.decay_shape=linear")
    assert (cfg.scheduler.decay_fraction, cfg.scheduler.min_lr_ratio) == (0.2, 0.0)
    # Horizon train.max_steps = 10: the peak until step 8, then 1 - (9 - 8) / 2 at step 9.
    assert schedule_factor(7, cfg.scheduler, max_steps=10) == 1.0
    assert schedule_factor(9, cfg.scheduler, max_steps=10) == pytest.approx(0.5)
    cosine = compose_config("scheduler=cosine").scheduler  # no wsd keys: schedule_factor still works
    assert schedule_factor(30, cosine, max_steps=40) == pytest.approx(
        lr_factor(30, name="cosine", warmup_steps=20, decay_steps=40, min_lr_ratio=0.1)
    )
    with pytest.raises(ConfigError, match="decay_fraction"):
        lr_factor(5, name="wsd", warmup_steps=0, decay_steps=10, min_lr_ratio=0.0)


@pytest.mark.parametrize(
    "overrides,fragment",
    [
        (["scheduler=wsd", "scheduler.decay_fraction=0"], r"scheduler\.decay_fraction=0"),
        (["scheduler=cosine", "scheduler.name=wsd"], "choose it with scheduler=wsd"),
    ],
)
def test_bad_wsd_settings_are_refused(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        validate_config(compose_config(*overrides))


def test_a_decay_shape_outside_the_choices_is_refused_at_composition():
    message = composition_error("scheduler=wsd", "scheduler.decay_shape=exp")
    assert "Invalid value 'exp', expected one of [linear, cosine, 1-sqrt]" in message
    assert "full_key: scheduler.decay_shape" in message


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
    for name in ("adamw", "sgd", "lion", "adafactor"):
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


def test_deepspeed_builds_its_fused_ops_under_an_arch_list_with_hopper_suffixes(monkeypatch):
    """CUDA images for Hopper set TORCH_CUDA_ARCH_LIST=...9.0a, which DeepSpeed's own JIT builder cannot parse
    (seen on an H200: adam_deepspeed stopped with "invalid literal for int() with base 10: '0a'")."""
    from deepspeed.ops.op_builder.fused_adam import FusedAdamBuilder

    from trainer.optim import deepspeed_parsable_arch_list

    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0a 10.0f+PTX")
    builder = FusedAdamBuilder()
    builder.jit_mode = True
    with pytest.raises(ValueError, match="invalid literal"):
        builder.compute_capability_args()
    with deepspeed_parsable_arch_list():
        assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.0;9.0 10.0+PTX"
        builder.compute_capability_args()  # DeepSpeed rewrites the variable as it goes
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.0;9.0a 10.0f+PTX"  # the user's value is back
