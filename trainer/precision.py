"""Mixed precision: the compute dtype of the forward pass and fp16's dynamic loss scaling.

Master weights and optimizer states stay in `train.dtype` (float32 unless a config asks otherwise); the
precision only changes what the matmuls run in. Each strategy applies it its own way: autocast for
`single`/`ddp`, FSDP2's MixedPrecisionPolicy for `fsdp`, DeepSpeed's bf16/fp16 sections for ZeRO (see
`trainer/strategies/`). This module holds what they share: the
dtypes, the loss scaler, the count of skipped (overflowing) steps, and the checks that a precision can
run where it was asked to.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import torch
from torch import nn

from trainer.errors import ConfigError, LossScaleError
from trainer.utils import require, resolve_dtype

# name: (compute dtype, dynamic loss scaling for fp16's narrow range, torchao float8 linears)
PRECISIONS: dict[str, tuple[torch.dtype | None, bool, bool]] = {
    "fp32": (None, False, False),
    "bf16": (torch.bfloat16, False, False),
    "fp16": (torch.float16, True, False),
    "fp8": (torch.bfloat16, False, True),
}
FP8_MIN_CAPABILITY = (8, 9)


class Precision:
    """One run's precision settings plus, for fp16, the loss scaler and its bookkeeping."""

    def __init__(self, cfg: Any, device: torch.device) -> None:
        self.name: str = str(cfg.name)
        self.device = device
        self.compute_dtype, self.loss_scaling, self.fp8 = PRECISIONS[self.name]
        self.reduce_dtype = resolve_dtype(cfg.reduce_dtype)
        self.min_loss_scale = float(cfg.min_loss_scale)
        self.fp8_recipe = str(cfg.fp8_recipe)
        self.fp8_all_gather = bool(cfg.fp8_all_gather)
        self.scaler_kwargs = {
            "init_scale": float(cfg.init_scale),
            "growth_factor": float(cfg.growth_factor),
            "backoff_factor": float(cfg.backoff_factor),
            "growth_interval": int(cfg.growth_interval),
        }
        self.scaler: torch.amp.GradScaler | None = None
        self.external_scaler: Any = None  # DeepSpeed's loss scaler (its `cur_scale`) under ZeRO
        self.skipped_steps = 0
        if self.fp8:
            check_fp8_supported(device)

    def make_scaler(self, *, sharded: bool = False) -> None:
        """Create the fp16 loss scaler (the sharded one all-reduces the overflow flag across ranks)."""
        if not self.loss_scaling:
            return
        if sharded:
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            self.scaler = ShardedGradScaler(device=self.device.type, **self.scaler_kwargs)
        else:
            self.scaler = torch.amp.GradScaler(self.device.type, **self.scaler_kwargs)

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast to the compute dtype (nothing in fp32)."""
        if self.compute_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss if self.scaler is None else self.scaler.scale(loss)

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer step, skipped by the scaler when the gradients overflowed; updates the scale."""
        if self.scaler is None:
            optimizer.step()
            return
        before = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        self.record(skipped=self.scaler.get_scale() < before, scale_before=before)

    def record(self, *, skipped: bool, scale_before: float) -> None:
        """Count a skipped step; stop the run when it overflowed at the minimum scale."""
        if not skipped:
            return
        self.skipped_steps += 1
        if scale_before <= self.min_loss_scale:
            raise LossScaleError(
                f"fp16 gradients overflowed with the loss scale already at its minimum ({scale_before:g} <= "
                f"precision.min_loss_scale={self.min_loss_scale:g}); fp16 cannot represent this run's values. "
                "Use precision=bf16 (same speed on GPUs that have it, no loss scaling); the checkpoints saved "
                "so far are intact"
            )

    @property
    def loss_scale(self) -> float | None:
        if self.scaler is not None:
            return float(self.scaler.get_scale())
        if self.external_scaler is not None:
            return float(self.external_scaler.cur_scale)
        return None

    def metrics(self) -> dict[str, float]:
        """What metrics.jsonl gets: the current scale and the skipped steps so far (fp16 only)."""
        if not self.loss_scaling:
            return {}
        out: dict[str, float] = {"skipped_steps": self.skipped_steps}
        if self.loss_scale is not None:
            out["loss_scale"] = self.loss_scale
        return out

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"skipped_steps": self.skipped_steps}
        if self.scaler is not None:
            state["scaler"] = {k: float(v) for k, v in self.scaler.state_dict().items()}
        elif self.external_scaler is not None:
            state["loss_scale"] = self.loss_scale
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped_steps = int(state.get("skipped_steps", 0))
        if self.scaler is not None and state.get("scaler"):
            scaler = dict(state["scaler"])
            scaler["_growth_tracker"] = int(scaler.get("_growth_tracker", 0))
            scaler["growth_interval"] = int(
                scaler.get("growth_interval", self.scaler_kwargs["growth_interval"])
            )
            self.scaler.load_state_dict(scaler)
        elif self.external_scaler is not None and "loss_scale" in state:
            self.external_scaler.cur_scale = float(state["loss_scale"])


def check_fp8_supported(device: torch.device) -> None:
    """fp8 matmuls need torchao and an NVIDIA GPU of compute capability 8.9 or newer."""
    if device.type != "cuda":
        raise ConfigError(
            f"precision=fp8 needs an NVIDIA GPU with compute capability {FP8_MIN_CAPABILITY[0]}."
            f"{FP8_MIN_CAPABILITY[1]}+ (H100, H200, L4, RTX 4090); this run is on {device.type}. "
            "Use precision=bf16"
        )
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_MIN_CAPABILITY:
        raise ConfigError(
            f"precision=fp8 needs compute capability 8.9+ (H100, H200, L4, RTX 4090); "
            f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}. Use precision=bf16"
        )
    require("torchao.float8", extra="quant", package="torchao")


def _fp8_eligible(module: nn.Module, fqn: str) -> bool:
    """Linear layers whose both dimensions divide by 16 (fp8 GEMM tiles); never the LM head."""
    if not isinstance(module, nn.Linear) or "lm_head" in fqn:
        return False
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


def convert_to_fp8(model: nn.Module, recipe: str = "tensorwise", *, all_gather: bool = False) -> int:
    """Swap eligible linears for torchao's Float8Linear (dynamic scaling, torchao's `recipe`: tensorwise,
    rowwise or rowwise_with_gw_hp); `all_gather`: their weights wrapped so that FSDP2 gathers them in float8
    (tensorwise). Returns how many were swapped."""
    float8 = require("torchao.float8", extra="quant", package="torchao")
    config = float8.Float8LinearConfig.from_recipe_name(recipe)
    if all_gather:
        config = dataclasses.replace(config, enable_fsdp_float8_all_gather=True)
    float8.convert_to_float8_training(model, module_filter_fn=_fp8_eligible, config=config)
    swapped = sum(type(m).__name__ == "Float8Linear" for m in model.modules())
    if swapped == 0:
        raise ConfigError(
            "precision=fp8 found no nn.Linear layer with both dimensions divisible by 16 to run in fp8 (GPT-2's "
            "Conv1D layers are not nn.Linear); use precision=bf16 for this model"
        )
    return swapped
