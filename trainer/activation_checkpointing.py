"""Activation checkpointing of the decoder blocks: `train.activation_checkpointing` false, true or selective.

`true` keeps only each block's input and runs the whole block's forward again in the backward: the least
memory, a third more FLOPs. `selective` keeps what is costly to compute, the outputs of the matmuls and of the
attention kernel, and recomputes only the cheap ops between them (norms, RoPE, activation functions, residual
adds), which on a GPU are bound by memory bandwidth: almost no FLOPs are repeated, and the memory those ops'
outputs took is freed. torchtitan's op-level selective checkpointing rests on the same trade; it also
recomputes every second matmul to save more memory, which this policy does not.

The blocks are checkpointed through transformers' own hook (`activation_checkpointing_enable`), which wraps
each decoder layer's call in torch.utils.checkpoint; `selective` passes it a `context_fn` with the policy.
Both the trainer (trainer/loop.py) and the planner's traced step (trainer/plan/activations.py) switch it on
here, so the plan measures the policy the run uses.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

# The values `train.activation_checkpointing` takes (the YAML's false/true stay booleans), in order of the
# memory they keep.
MODES: tuple[Any, ...] = (False, "selective", True)
# One of MODES.
Mode = bool | str


@functools.cache
def saved_ops() -> frozenset:
    """The operators whose outputs `selective` keeps: matmuls (fp8's scaled ones too) and the fused
    attention kernels (with their log-sum-exp, which the attention backward needs)."""
    aten = torch.ops.aten
    names = [
        "mm",
        "addmm",
        "bmm",
        "baddbmm",
        "_scaled_mm",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_fused_attention_overrideable",
    ]
    return frozenset(getattr(aten, name).default for name in names if hasattr(aten, name))


def selective_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in saved_ops() else CheckpointPolicy.PREFER_RECOMPUTE


def selective_contexts() -> tuple[Any, Any]:
    """The forward and recompute contexts of one checkpointed call (a fresh pair per call)."""
    return create_selective_checkpoint_contexts(selective_policy)


def is_valid_mode(value: Any) -> bool:
    return isinstance(value, bool) or value == "selective"


def enable_activation_checkpointing(model: Any, mode: Mode) -> None:
    """Checkpoint every decoder block of the transformers `model` as `mode` says (False: leave it)."""
    if not mode:
        return
    kwargs: dict[str, Any] = {"use_reentrant": False}
    if mode == "selective":
        kwargs["context_fn"] = selective_contexts
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
