"""Every shipped optimizer that runs on CPU trains under every strategy it supports, and its state survives a
checkpoint exactly; the others fail before any work with what to install, the hardware needed, or the
alternative.

The round trip: run A takes 2 steps, saves, takes 2 more; run B resumes from A's checkpoint. B's optimizer
state right after loading equals A's at the save, tensor for tensor (this rank's shards), and B's next two
steps repeat A's losses and final weights bitwise. Multi-rank runs are 2 real gloo ranks.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from torch.distributed.tensor import DTensor

from tests.conftest import TINY, compose_config, free_port, spawn_ranks
from trainer.distributed import ParallelEnv
from trainer.errors import ConfigError, MissingPackageError
from trainer.optim import APEX_INSTALL, build_optimizer, check_optimizer
from trainer.optimizers import Lion

COMMON = [*TINY, "train.micro_batch_size=2", "scheduler=constant", "train.export_hf=false"]
# Small tensors would keep 32-bit states (min_8bit_size=4096 by default): quantize every tiny-model matrix.
EXTRA = {"adamw_8bit": ["optimizer.min_8bit_size=256"]}
# Which optimizers each strategy runs on CPU; every other pairing is refused (test_unsupported_pairings_...).
RUNS = {
    "single": ["adamw", "sgd", "lion", "adafactor", "adamw_8bit"],
    "ddp": ["adamw", "sgd", "lion", "adafactor", "adamw_8bit"],
    "fsdp": ["adamw", "sgd", "lion"],
    "zero2": ["adamw", "sgd", "lion"],
}


def _local(t: torch.Tensor) -> torch.Tensor:
    return (t.to_local() if isinstance(t, DTensor) else t).detach().clone()


def _optimizer_state(optimizer, strategy: str) -> dict[str, object]:
    """Every state entry of the torch optimizer (under ZeRO: the one DeepSpeed steps), this rank's part."""
    inner = optimizer.optimizer if strategy.startswith("zero") else optimizer
    out: dict[str, object] = {}
    for g, group in enumerate(inner.param_groups):
        for i, p in enumerate(group["params"]):
            for key, value in inner.state.get(p, {}).items():
                out[f"{g}/{i}/{key}"] = _local(value) if torch.is_tensor(value) else value
        if "step" in group:
            out[f"{g}/step"] = group["step"]
    return out


def _weights(trainer) -> dict[str, torch.Tensor]:
    """Whole weights on rank 0 (a collective), copied: on CPU some strategies return the live tensors."""
    return {k: v.clone() for k, v in trainer.strategy.full_state_dict(trainer.module).items()}


def _assert_same_state(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys(), what
    for key, value in want.items():
        if torch.is_tensor(value):
            assert got[key].dtype == value.dtype and torch.equal(got[key], value), f"{what}: {key}"
        else:
            assert got[key] == value, f"{what}: {key}"


def round_trip(
    rank: int, world: int, port: int, strategy: str, names: list[str], root: str, extra: list[str]
):
    """One rank: for each optimizer, 4 steps straight with a save at step 2, then a resume from that save."""
    from trainer.distributed import destroy
    from trainer.loop import Trainer

    if world > 1:
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world)
        )
    env = ParallelEnv(rank, world, rank)
    try:
        for name in names:
            what = f"optimizer={name} strategy={strategy}"
            overrides = [*COMMON, f"strategy={strategy}", f"optimizer={name}", *EXTRA.get(name, []), *extra]
            a = Trainer(compose_config(*overrides), run_dir=f"{root}/{name}", env=env)
            if name == "adam_deepspeed":  # offloaded: FusedAdam's CPU twin steps the states
                assert type(a.optimizer.optimizer).__name__ == "DeepSpeedCPUAdam"
            initial = _weights(a)
            losses = [a.train_step()["loss"] for _ in range(2)]
            checkpoint = a.save()
            saved = _optimizer_state(a.optimizer, strategy)
            losses += [a.train_step()["loss"] for _ in range(2)]
            final = _weights(a)

            b = Trainer(
                compose_config(*overrides, f"resume={checkpoint}"), run_dir=f"{root}/{name}_b", env=env
            )
            _assert_same_state(_optimizer_state(b.optimizer, strategy), saved, what)
            resumed = [b.train_step()["loss"] for _ in range(2)]
            assert resumed == losses[2:], (what, losses, resumed)
            got = _weights(b)
            for key in final:  # whole weights on rank 0
                assert not torch.equal(final[key], initial[key]), f"{what}: {key} never changed"
                assert torch.equal(got[key], final[key]), f"{what}: {key} differs after the resume"
            del a, b
    finally:
        destroy()


def _spawn(strategy: str, names: list[str], root, extra: list[str] = ()) -> None:
    if strategy == "single":
        round_trip(0, 1, 0, strategy, names, str(root), list(extra))
    else:
        spawn_ranks(round_trip, 2, free_port(), strategy, names, str(root), list(extra))


@pytest.mark.parametrize("strategy", list(RUNS))
def test_each_optimizer_trains_and_resumes_exactly(strategy, tmp_path):
    _spawn(strategy, RUNS[strategy], tmp_path)


def test_offloaded_zero_optimizers_train_and_resume_exactly(tmp_path):
    """ZeRO with the optimizer offloaded: adam_deepspeed becomes DeepSpeedCPUAdam (its C++ op is built on first
    use, minutes on 2 cores, cached after), whose step count is a Python int; torch's AdamW runs as it is."""
    _spawn("zero2", ["adam_deepspeed", "adamw"], tmp_path, ["strategy.offload_optimizer=cpu"])


# ---- Lion against the update rule by hand ---------------------------------------------------------------


@pytest.mark.parametrize("foreach", [False, True])
def test_lion_follows_the_update_rule(foreach):
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    opt = Lion([p], lr=0.1, betas=(0.9, 0.99), weight_decay=0.5, foreach=foreach)
    # Step 1, m = 0: p *= 1 - 0.1 * 0.5 -> [0.95, -1.9, 0.475]; sign(0.1 g) = [1, -1, 0]; p -= 0.1 * sign;
    # m = 0.01 g.
    p.grad = torch.tensor([0.3, -0.1, 0.0])
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([0.85, -1.8, 0.475]))
    torch.testing.assert_close(opt.state[p]["exp_avg"], torch.tensor([0.003, -0.001, 0.0]))
    # Step 2: p *= 0.95 -> [0.8075, -1.71, 0.45125]; 0.9 m + 0.1 g = [-0.0173, -0.0409, 0.01], signs
    # [-1, -1, 1]; p -= 0.1 * signs; m = 0.99 m + 0.01 g = [0.00097, -0.00499, 0.001].
    p.grad = torch.tensor([-0.2, -0.4, 0.1])
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([0.9075, -1.61, 0.35125]))
    torch.testing.assert_close(opt.state[p]["exp_avg"], torch.tensor([0.00097, -0.00499, 0.001]))


def test_lion_skips_parameters_without_gradients_and_refuses_bad_settings():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = Lion([a, b], lr=0.1)
    a.grad = torch.ones(2)
    opt.step()
    assert torch.equal(b.detach(), torch.ones(2)) and b not in opt.state
    with pytest.raises(ValueError, match="betas"):
        Lion([a], betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="lr"):
        Lion([a], lr=0.0)


def test_shipped_optimizers_build_with_their_config():
    cpu = torch.device("cpu")
    lion = build_optimizer(compose_config("optimizer=lion").optimizer, torch.nn.Linear(3, 2), device=cpu)
    assert isinstance(lion, Lion) and lion.param_groups[0]["foreach"] is True  # multi-tensor by default
    assert lion.param_groups[0]["weight_decay"] == 0.3 and lion.param_groups[1]["weight_decay"] == 0.0
    ada = build_optimizer(compose_config("optimizer=adafactor").optimizer, torch.nn.Linear(3, 2), device=cpu)
    assert isinstance(ada, torch.optim.Adafactor) and ada.param_groups[0]["eps"] == (None, 1e-3)


# ---- what cannot run here fails before any work ----------------------------------------------------------


def _strategy(name: str, *extra: str):
    from trainer.strategies import build_strategy

    return build_strategy(
        compose_config(f"strategy={name}", *extra), ParallelEnv(0, 2, 0), torch.device("cpu")
    )


@pytest.mark.parametrize(
    "optimizer,strategy,fragment",
    [
        ("adafactor", "fsdp", "strategy=ddp"),
        ("adafactor", "zero2", "flat 1-D partitions"),
        ("adamw_8bit", "fsdp", "DTensors"),
        ("adamw_8bit", "zero1", "quantized in blocks"),
        ("adamw_apex", "fsdp", "DTensors"),
        ("lamb_apex", "zero2", "trust ratio"),
        ("adam_deepspeed", "fsdp", "DTensors"),
    ],
)
def test_unsupported_pairings_are_refused_with_the_reason(optimizer, strategy, fragment):
    from trainer.strategies import build_strategy

    cfg = compose_config(f"optimizer={optimizer}", f"strategy={strategy}")
    with pytest.raises(ConfigError, match=f"strategy={strategy}.*{fragment}"):
        build_strategy(cfg, ParallelEnv(0, 2, 0), torch.device("cpu"))  # before any process group or data


@pytest.mark.parametrize("optimizer", ["adamw_apex", "lamb_apex", "adam_deepspeed"])
def test_cuda_only_optimizers_on_cpu_name_the_hardware(optimizer):
    cfg = compose_config(f"optimizer={optimizer}").optimizer
    with pytest.raises(ConfigError, match="needs an NVIDIA GPU.*optimizer=adamw"):
        check_optimizer(cfg, device=torch.device("cpu"))


def test_deepspeed_fused_adam_on_cpu_suggests_offload():
    cfg = compose_config("optimizer=adam_deepspeed").optimizer
    with pytest.raises(ConfigError, match="strategy.offload_optimizer=cpu"):
        build_optimizer(cfg, torch.nn.Linear(2, 2), device=torch.device("cpu"))
    # ... which is what runs it on a CPU machine (DeepSpeedCPUAdam):
    check_optimizer(
        cfg, device=torch.device("cpu"), strategy=_strategy("zero2", "strategy.offload_optimizer=cpu")
    )


def test_apex_offloaded_is_refused():
    cfg = compose_config("optimizer=adamw_apex").optimizer
    zero = _strategy("zero2", "strategy.offload_optimizer=cpu")
    with pytest.raises(ConfigError, match="CPU memory.*adam_deepspeed"):
        check_optimizer(cfg, device=torch.device("cuda"), strategy=zero)


@pytest.mark.parametrize("optimizer", ["adamw_apex", "lamb_apex"])
def test_apex_missing_names_the_install_command(optimizer, monkeypatch):
    monkeypatch.setitem(sys.modules, "apex", None)
    monkeypatch.setitem(sys.modules, "apex.optimizers", None)
    cfg = compose_config(f"optimizer={optimizer}").optimizer
    with pytest.raises(MissingPackageError, match="NVIDIA apex") as e:
        check_optimizer(cfg, device=torch.device("cuda"))  # a GPU run without apex
    assert APEX_INSTALL in str(e.value) and "git+https://github.com/NVIDIA/apex" in APEX_INSTALL


@pytest.mark.parametrize("optimizer,extra", [("adamw_8bit", "bnb"), ("adam_deepspeed", "deepspeed")])
def test_missing_package_names_the_extra(optimizer, extra, monkeypatch):
    package = {"bnb": "bitsandbytes", "deepspeed": "deepspeed"}[extra]
    monkeypatch.setitem(sys.modules, package, None)
    cfg = compose_config(f"optimizer={optimizer}").optimizer
    with pytest.raises(MissingPackageError, match=rf"pip install 'hydra-llm-trainer\[{extra}\]'"):
        check_optimizer(cfg, device=torch.device("cuda"))


def test_bitsandbytes_without_a_cpu_backend_names_the_hardware(monkeypatch):
    import trainer.optim as optim

    monkeypatch.setattr(optim, "_bitsandbytes_cpu_error", lambda: "bitsandbytes 0.42: no CPU kernel")
    cfg = compose_config("optimizer=adamw_8bit").optimizer
    with pytest.raises(ConfigError, match="NVIDIA GPU"):
        check_optimizer(cfg, device=torch.device("cpu"))
    check_optimizer(cfg, device=torch.device("cuda"))  # on a GPU bitsandbytes has its CUDA kernels
