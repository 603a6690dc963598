"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", arXiv:2302.06675).

Per parameter p with gradient g and momentum m (one state tensor, half of Adam's):

    p <- p * (1 - lr * weight_decay)                      decoupled weight decay
    p <- p - lr * sign(beta1 * m + (1 - beta1) * g)       every coordinate moves by exactly lr
    m <- beta2 * m + (1 - beta2) * g

The sign makes every update as large as lr: the paper uses a learning rate 3-10x smaller than AdamW's and a
weight decay 3-10x larger. On the tiny default model AdamW's 3e-3 suits Lion too (conf/optimizer/lion.yaml).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch


class Lion(torch.optim.Optimizer):
    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        foreach: bool | None = None,
    ) -> None:
        if lr <= 0.0:
            raise ValueError(f"Lion: lr={lr} must be > 0")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Lion: betas={betas} must be in [0, 1)")
        if weight_decay < 0.0:
            raise ValueError(f"Lion: weight_decay={weight_decay} must be >= 0")
        defaults = {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay, "foreach": foreach}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, moments = [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Lion does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                params.append(p)
                grads.append(p.grad)
                moments.append(state["exp_avg"])
            if not params:
                continue
            foreach = group["foreach"]
            if foreach is None:  # torch's choice: multi-tensor kernels on accelerators, a loop on CPU
                foreach = all(p.device.type != "cpu" for p in params)
            update = _foreach_lion if foreach else _single_tensor_lion
            beta1, beta2 = group["betas"]
            update(params, grads, moments, lr=group["lr"], beta1=beta1, beta2=beta2, wd=group["weight_decay"])
        return loss


def _single_tensor_lion(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    moments: list[torch.Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    wd: float,
) -> None:
    for p, g, m in zip(params, grads, moments, strict=True):
        if wd:
            p.mul_(1.0 - lr * wd)
        p.add_(m.lerp(g, 1.0 - beta1).sign_(), alpha=-lr)  # lerp(m, g, w) = (1 - w) m + w g
        m.lerp_(g, 1.0 - beta2)


def _foreach_lion(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    moments: list[torch.Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    wd: float,
) -> None:
    if wd:
        torch._foreach_mul_(params, 1.0 - lr * wd)
    updates = torch._foreach_lerp(moments, grads, 1.0 - beta1)
    torch._foreach_sign_(updates)
    torch._foreach_add_(params, updates, alpha=-lr)
    torch._foreach_lerp_(moments, grads, 1.0 - beta2)
