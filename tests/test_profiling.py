import json

import pytest
from torch.autograd import DeviceType
from torch.autograd.profiler_util import FunctionEvent

from tests.conftest import TINY, compose_config, make_trainer
from trainer.config import validate_config
from trainer.errors import ConfigError
from trainer.profiling import busy_time_by_kind, kind_of


def test_a_profiled_window_records_exactly_its_steps_and_writes_trace_ops_and_summary(tmp_path, capsys):
    overrides = ["train.max_steps=4", "profile.enabled=true", "profile.start_step=2", "profile.steps=2"]
    make_trainer(tmp_path, *TINY, *overrides).train()
    profile = tmp_path / "profile"
    assert sorted(p.name for p in profile.iterdir()) == [
        "rank0_ops.txt",
        "rank0_summary.json",
        "rank0_trace.json",
    ]

    trace = json.loads((profile / "rank0_trace.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"train_step_2", "train_step_3", "aten::mm"} <= names
    assert not {"train_step_1", "train_step_4"} & names
    assert "aten::mm" in (profile / "rank0_ops.txt").read_text()

    summary = json.loads((profile / "rank0_summary.json").read_text())
    assert summary["steps"] == [2, 3] and summary["device"] == "cpu"
    by_kind = summary["by_kind_s"]
    assert sum(by_kind.values()) == pytest.approx(summary["busy_s"])
    # A tiny Llama step: matmuls, SDPA attention and AdamW; one process, so no communication.
    assert by_kind["matmul"] > 0 and by_kind["attention"] > 0 and by_kind["optimizer"] > 0
    assert by_kind["communication"] == 0
    assert summary["busy_fraction"] == pytest.approx(summary["busy_s"] / summary["wall_s"])
    assert sum(summary["by_kind_share"].values()) == pytest.approx(1.0)
    assert f"profile of steps 2-3: {profile}" in capsys.readouterr().out


@pytest.mark.parametrize(
    "name, kind",
    [
        ("aten::mm", "matmul"),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matmul"),
        ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT", "matmul"),
        ("aten::_scaled_mm", "matmul"),
        ("flash_fwd_kernel", "attention"),
        ("aten::_scaled_dot_product_flash_attention_for_cpu_backward", "attention"),
        ("ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "communication"),
        ("gloo:all_reduce", "communication"),
        ("FSDP::all_gather_copy_in", "communication"),
        ("Optimizer.step#AdamW.step", "optimizer"),
        ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<...>", "optimizer"),
        ("triton_poi_fused_add_mul_silu_0", "compiled"),
        ("aten::add", "other"),
        ("aten::broadcast_tensors", "other"),
    ],
)
def test_each_op_or_kernel_has_the_kind_its_name_says(name, kind):
    assert kind_of(name) == kind


def _cpu_op(
    id: int, name: str, start: float, end: float, parent: FunctionEvent | None = None
) -> FunctionEvent:
    op = FunctionEvent(id=id, name=name, thread=1, start_us=start, end_us=end)
    if parent is not None:
        op.set_cpu_parent(parent)
        parent.append_cpu_child(op)
    return op


def _kernel(name: str, launcher: FunctionEvent, us: float) -> FunctionEvent:
    return FunctionEvent(
        id=1000 + launcher.id,
        name=name,
        thread=7,
        start_us=0,
        end_us=us,
        device_type=DeviceType.CUDA,
        linked_correlation_id=launcher.id,
    )


def test_a_kernel_without_a_kind_takes_the_kind_of_the_op_that_launched_it():
    """The GPU's busy time, from events shaped as torch.profiler builds them: a kernel names its launching CPU op
    by the op's id; a plain elementwise kernel inside the optimizer's step is optimizer time."""
    step = _cpu_op(1, "train_step_5", 0, 100)
    mm = _cpu_op(2, "aten::mm", 1, 2, step)
    opt = _cpu_op(3, "Optimizer.step#AdamW.step", 10, 20, step)
    mul = _cpu_op(4, "aten::mul_", 11, 12, opt)
    add = _cpu_op(5, "aten::add", 30, 31, step)
    kernels = [
        _kernel("sm90_xmma_gemm_bf16bf16", mm, 300.0),
        _kernel("void at::native::vectorized_elementwise_kernel<4, MulFunctor>", mul, 20.0),
        _kernel("void at::native::vectorized_elementwise_kernel<4, AddFunctor>", add, 5.0),
    ]
    totals = busy_time_by_kind([step, mm, opt, mul, add, *kernels], on_device=True)
    assert totals["matmul"] == pytest.approx(300e-6)
    assert totals["optimizer"] == pytest.approx(20e-6)
    assert totals["other"] == pytest.approx(5e-6)
    assert sum(totals.values()) == pytest.approx(325e-6)  # the CPU ops' own times are not the GPU's


@pytest.mark.parametrize(
    "window, message",
    [
        (["profile.start_step=5", "profile.steps=3"], "records up to step 7, past train.max_steps=6"),
        (["profile.start_step=0"], "profile.start_step=0: must be >= 1"),
        (["profile.steps=0"], "profile.steps=0: must be >= 1"),
    ],
)
def test_a_profile_window_outside_the_run_is_refused_before_training(window, message):
    cfg = compose_config(*TINY, "profile.enabled=true", *window)
    with pytest.raises(ConfigError, match=message):
        validate_config(cfg)
