"""The one shape every loop feature takes: an `Extension` with fixed hook points, called in a fixed order.

Distillation, pruning, quantization-aware training and adapters (LoRA, DoRA) are extensions. The `Trainer`
keeps one list of the active ones (`trainer.loop.build_extensions`); a feature that is off is absent from the
list, so the loop has no branch for it. Each hook runs for every extension in list order.

The hooks, in the order a run reaches them:

1. `build_model(vocab_size, dtype)`: build the model instead of the model group (a distillation student cut
   from its teacher). The first extension that returns a model wins; None leaves it to `model.*`.
2. `before_wrap(model, resume)`: change the bare HF model before any strategy wraps it (QAT swaps linears
   for fake-quantized ones, pruning prunes or restores the masks of the checkpoint `resume` names).
3. `wrap_loss(model, loss_chunk_size, seed)`: the module that computes the loss around the HF model
   (distillation's mixed loss). The first non-None wins; None: the plain causal-LM loss.
4. `after_setup(strategy, module, optimizer)`: the strategy has placed the model and built the optimizer
   (pruning attaches its masks to what each rank holds, distillation has its teacher placed like the student).
5. `forward_inputs(input_ids, position_ids)`: a context around each training forward that yields extra keyword arguments
   for the loss module (the teacher's outputs).
6. `after_step(step)`: after each optimizer step (gradual pruning updates its masks).
7. `checkpoint_slices()`: flat-shard tensors saved with each checkpoint (pruning masks); they are restored in
   `before_wrap` from the checkpoint resumed from. `checkpoint_state()`: JSON-able entries added to the
   checkpoint's trainer_state.json (the adapters' base model reference), read back in `before_wrap` too.
8. `step_metrics()` after each step (cheap, every rank), `log_metrics()` on logging steps (may be a
   collective), `eval_batch(input_ids, labels, position_ids)` per eval batch and `eval_metrics()` after each evaluation.
9. `export_weights(state_dict, hf_model)`: the whole weights (on rank 0; other ranks get {}) and the model
   whose `save_pretrained` writes `hf/`, each extension's answer passed to the next (adapters merged into a
   plain model). `finish(run_dir)`: export-time work once the `hf/` export is written (the sparsity report,
   QAT's conversion to `quantized/`, the adapters' `adapter/`); `summary_lines()` adds to the final console
   summary.

Every hook has a do-nothing default, so an extension defines only the hooks it needs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn


class Extension:
    """A loop feature. Subclasses override the hooks they need; see the module docstring for the order."""

    name = "extension"

    def build_model(self, *, vocab_size: int, dtype: torch.dtype) -> nn.Module | None:
        return None

    def before_wrap(self, model: nn.Module, *, resume: Path | None) -> None:
        pass

    def wrap_loss(self, model: nn.Module, *, loss_chunk_size: int | None, seed: int) -> nn.Module | None:
        return None

    def after_setup(self, strategy: Any, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        pass

    @contextlib.contextmanager
    def forward_inputs(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None
    ) -> Iterator[dict[str, Any]]:
        yield {}

    def after_step(self, step: int) -> None:
        pass

    def checkpoint_slices(self) -> list:
        return []

    def checkpoint_state(self) -> dict[str, Any]:
        return {}

    def step_metrics(self) -> dict[str, Any]:
        return {}

    def log_metrics(self) -> dict[str, Any]:
        return {}

    def eval_batch(
        self, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor | None = None
    ) -> None:
        pass

    def eval_metrics(self) -> dict[str, float]:
        return {}

    def export_weights(
        self, state_dict: dict[str, torch.Tensor], hf_model: nn.Module
    ) -> tuple[dict[str, torch.Tensor], nn.Module]:
        return state_dict, hf_model

    def finish(self, run_dir: Path) -> None:
        pass

    def summary_lines(self) -> list[str]:
        return []
