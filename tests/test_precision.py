"""Mixed precision: bf16, fp16 and fp8 against fp32, fp16's loss scaling, and where fp8 cannot run.

Tolerance (documented in the README): over 6 steps of the tiny model, every step's loss under bf16 stays
within 2e-3 relative of the fp32 single-process loss, and under fp16 within 1e-3 (bf16 keeps 8 bits of
mantissa, fp16 11; master weights, optimizer states and the loss stay fp32 in both). fp8 (e4m3 forward,
e5m2 gradients, one scale per tensor, bf16 elsewhere) stays within 3e-3 (measured: 6e-4). fp16 runs start from a
loss scale of 1024 here, so that no step overflows and the curves are comparable step by step.
"""

import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import (
    TINY,
    compose_config,
    free_port,
    make_trainer,
    run_command,
    spawn_ranks,
    train_losses,
)
from trainer.distributed import ParallelEnv
from trainer.errors import ConfigError, LossScaleError, MissingPackageError
from trainer.precision import check_fp8_supported
from trainer.strategies import build_strategy

COMMON = [*TINY, "train.micro_batch_size=2", "train.log_every=1", "scheduler=constant"]
TOLERANCE = {"bf16": 2e-3, "fp16": 1e-3, "fp8": 3e-3}
NO_OVERFLOW = "precision.init_scale=1024"


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("fp32")
    run_command([*COMMON, f"hydra.run.dir={run_dir}"])
    return run_dir


@pytest.fixture(scope="module")
def fp32_losses(fp32_run):
    return train_losses(fp32_run)


@pytest.mark.parametrize(
    "strategy,precision,nproc",
    [("single", "bf16", 1), ("single", "fp16", 1)]
    + [("ddp", "bf16", 2), ("ddp", "fp16", 2), ("fsdp", "bf16", 2), ("fsdp", "fp16", 2)]
    + [("zero1", "bf16", 2), ("zero2", "bf16", 2), ("zero3", "bf16", 2)],
)
def test_mixed_precision_tracks_fp32(strategy, precision, nproc, fp32_losses, tmp_path):
    args = [
        *COMMON,
        f"strategy={strategy}",
        f"precision={precision}",
        NO_OVERFLOW,
        f"hydra.run.dir={tmp_path}",
    ]
    proc = run_command(args, nproc=nproc)
    assert f"precision {precision}" in proc.stdout
    got = train_losses(tmp_path)
    assert sorted(got) == sorted(fp32_losses)
    for step, want in fp32_losses.items():
        assert got[step] == pytest.approx(want, rel=TOLERANCE[precision]), (step, fp32_losses, got)
    assert any(got[s] != fp32_losses[s] for s in got)  # computed in another precision: not fp32's bits
    # Training moved: the last loss is clearly below the first, as in fp32.
    assert got[max(got)] < got[1] - 0.1
    # The export holds the fp32 master weights, whatever the compute dtype was.
    exported = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert exported and all(t.dtype == torch.float32 for t in exported.values())


def _fp8_rank(rank: int, world: int, port: int, strategy: str, run_dir: str, *extra: str) -> None:
    """One rank of a precision=fp8 run on this CPU. torch's CPU `_scaled_mm` runs torchao's float8 linears,
    so only the CUDA gate is lifted here: conversion, autocast, sharding, checkpoint and export are real."""
    import os

    import trainer.precision
    from trainer.distributed import ParallelEnv, destroy
    from trainer.loop import Trainer

    if world > 1:  # a spawned rank: its own process
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world)
        )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer.precision, "check_fp8_supported", lambda device: None)
        try:
            cfg = compose_config(*COMMON, f"strategy={strategy}", "precision=fp8", *extra)
            t = Trainer(cfg, run_dir=run_dir, env=ParallelEnv(rank, world, rank))
            kinds = {name: type(m).__name__ for name, m in t.module.named_modules()}
            layers = cfg.model.arch.num_hidden_layers
            assert sum(k == "Float8Linear" for k in kinds.values()) == 7 * layers, kinds
            assert next(k for n, k in kinds.items() if n.endswith("lm_head")) == "Linear"  # never in fp8
            # fp8_all_gather: each float8 linear's shard is torchao's weight that FSDP2 gathers in float8
            wrapped = (
                {
                    type(m.weight.to_local()).__name__
                    for m in t.module.modules()
                    if type(m).__name__ == "Float8Linear"
                }
                if cfg.precision.fp8_all_gather
                else set()
            )
            assert (
                wrapped <= {"WeightWithDynamicFloat8CastTensor"}
                and bool(wrapped) == cfg.precision.fp8_all_gather
            )
            t.train()
        finally:
            destroy()


@pytest.mark.parametrize(
    "strategy,nproc,extra",
    [
        ("single", 1, []),  # ddp: single's fp8 path, replicated
        ("fsdp", 2, []),
        (
            "fsdp",
            2,
            ["precision.fp8_all_gather=true"],
        ),  # float8 weights gathered, scales precomputed per step
    ],
    ids=["single", "fsdp", "fsdp_fp8_all_gather"],
)
def test_fp8_linears_train_tracking_fp32_and_export_fp32_weights(
    strategy, nproc, extra, fp32_run, fp32_losses, tmp_path
):
    if nproc == 1:
        _fp8_rank(0, 1, 0, strategy, str(tmp_path), *extra)
    else:
        spawn_ranks(_fp8_rank, nproc, free_port(), strategy, str(tmp_path), *extra, nprocs=nproc)
    got = train_losses(tmp_path)
    assert sorted(got) == sorted(fp32_losses)
    for step, want in fp32_losses.items():
        assert got[step] == pytest.approx(want, rel=TOLERANCE["fp8"]), (step, fp32_losses, got)
    assert any(got[s] != fp32_losses[s] for s in got) and got[max(got)] < got[1] - 0.1
    # The export: plain fp32 master weights under the HF names, as an fp32 run writes them.
    exported = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert exported.keys() == load_file(str(fp32_run / "hf" / "model.safetensors")).keys()
    assert all(type(t) is torch.Tensor and t.dtype == torch.float32 for t in exported.values())


def test_the_fp8_recipe_picks_torchaos_scaling_and_rowwise_keeps_small_rows_that_tensorwise_loses():
    """precision.fp8_recipe reaches the float8 linears; against the float32 matmul, one scale per tensor
    flushes rows 10^6 times smaller than the largest to zero (below e4m3's range), one scale per row keeps
    every row to e4m3's precision (~4% here)."""
    from torchao.float8.config import ScalingGranularity

    from trainer.precision import convert_to_fp8

    assert str(compose_config("precision=fp8").precision.fp8_recipe) == "tensorwise"  # the default
    torch.manual_seed(0)
    weight = torch.randn(64, 64)
    x = torch.randn(32, 64) * torch.logspace(0, -6, 32).unsqueeze(1)  # row i scaled by 10^(-6i/31)
    want = x @ weight.T
    errors = {}
    for recipe in ("tensorwise", "rowwise", "rowwise_with_gw_hp"):
        model = torch.nn.Sequential(torch.nn.Linear(64, 64, bias=False))
        model[0].weight.data.copy_(weight)
        assert (
            convert_to_fp8(model, str(compose_config(f"precision.fp8_recipe={recipe}").precision.fp8_recipe))
            == 1
        )
        granularity = model[0].config.cast_config_input.scaling_granularity
        assert granularity == (
            ScalingGranularity.TENSORWISE if recipe == "tensorwise" else ScalingGranularity.AXISWISE
        )
        got = model(x.bfloat16()).float()
        errors[recipe] = ((got - want).norm(dim=1) / want.norm(dim=1)).detach()
    assert errors["tensorwise"][-1] > 0.9  # the smallest row: lost
    assert errors["rowwise"].max() < 0.1 and errors["rowwise_with_gw_hp"].max() < 0.1


def _inject_overflow(trainer):
    """Make the next forward's loss infinite, as a real overflow would make the scaled gradients."""
    real = trainer.module.forward

    def overflowing(*args, **kwargs):
        trainer.module.forward = real  # once
        return real(*args, **kwargs) * float("inf")

    trainer.module.forward = overflowing


def _weights(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.module.state_dict().items()}


def test_fp16_overflow_skips_exactly_that_step_and_lowers_the_scale(tmp_path):
    trainer = make_trainer(tmp_path, *COMMON, "precision=fp16", NO_OVERFLOW, "train.global_batch_size=2")
    first = trainer.train_step()
    assert first["loss_scale"] == 1024 and first["skipped_steps"] == 0
    before = _weights(trainer)
    moments = [s["exp_avg"].clone() for s in trainer.optimizer.state.values()]

    _inject_overflow(trainer)
    stats = trainer.train_step()
    assert stats["skipped_steps"] == 1 and stats["loss_scale"] == 512  # backoff 0.5
    after = _weights(trainer)
    assert all(torch.equal(before[k], after[k]) for k in before), "a skipped step changed the weights"
    assert all(
        torch.equal(m, s["exp_avg"]) for m, s in zip(moments, trainer.optimizer.state.values(), strict=True)
    )

    stats = trainer.train_step()  # the next step trains again, at the lowered scale
    assert stats["skipped_steps"] == 1 and stats["loss_scale"] == 512
    assert any(not torch.equal(after[k], v) for k, v in _weights(trainer).items())


def test_fp16_overflow_at_the_minimum_scale_stops_the_run_and_suggests_bf16(tmp_path):
    trainer = make_trainer(
        tmp_path, *COMMON, "precision=fp16", "precision.init_scale=2", "precision.min_loss_scale=2"
    )
    _inject_overflow(trainer)
    with pytest.raises(LossScaleError, match="precision=bf16"):
        trainer.train_step()


def test_fp16_loss_scale_survives_a_resume(tmp_path):
    # From the default scale of 65536 the first step overflows: the scale after it must come back on resume.
    exact = [*COMMON, "precision=fp16", "train.export_hf=false"]
    straight = make_trainer(tmp_path / "a", *exact, "train.max_steps=4")
    straight.train()
    assert straight.strategy.precision.skipped_steps >= 1
    make_trainer(tmp_path / "b", *exact, "train.max_steps=2").train()
    resumed = make_trainer(tmp_path / "b", *exact, "train.max_steps=4", "resume=auto")
    assert resumed.strategy.precision.loss_scale < 65536
    resumed.train()
    assert resumed.strategy.precision.skipped_steps == straight.strategy.precision.skipped_steps
    a, b = _weights(straight), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _strategy(*overrides: str, world_size: int = 2):
    from tests.conftest import compose_config

    return build_strategy(compose_config(*overrides), ParallelEnv(0, world_size, 0), torch.device("cpu"))


def test_fp16_under_deepspeed_on_cpu_says_to_use_bf16():
    with pytest.raises(ConfigError, match="precision=bf16"):
        _strategy("strategy=zero2", "precision=fp16")


def test_fp8_on_cpu_names_the_hardware_it_needs():
    with pytest.raises(ConfigError, match="compute capability 8.9"):
        _strategy("precision=fp8", world_size=1)


def test_fp8_on_an_older_gpu_names_the_hardware_it_needs(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(ConfigError, match="A100 has 8.0"):
        check_fp8_supported(torch.device("cuda", 0))


def test_fp8_without_torchao_names_the_extra(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.float8", None)
    with pytest.raises(MissingPackageError, match=r"trainer\[quant\]"):
        check_fp8_supported(torch.device("cuda", 0))
