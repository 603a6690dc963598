"""Activation memory measured, not guessed: one training forward and backward of the real loss module
(`CausalLMWithLoss`, the fused chunked cross-entropy) traced on fake tensors (FakeTensorMode: shapes and
dtypes, no storage) under torch's MemTracker, for the model cut to 1 and to 2 transformer blocks; a model of L
blocks holds the first plus L - 1 times the difference. Nothing is allocated, so a 70B model's blocks trace
as fast as a tiny one's.

The trace builds the module as the strategy runs it: FSDP2 and DeepSpeed compute with weights in the compute
dtype (a gathered bf16 copy, DeepSpeed's bf16 module), single and ddp with the stored weights under autocast;
activation checkpointing is switched on as trainer/loop.py does.

With train.compile=true the step is traced compiled (the decoder; the fused loss eagerly, see
`compile_as_traced`): torch.compile with the `aot_eager_decomp_partition` backend, which is inductor's front half (its decompositions, AOT autograd's min-cut rematerialization
partitioner with compiler="inductor") with the partitioned forward and backward graphs run op by op instead of
inductor's generated kernels. The forward therefore saves exactly the tensors inductor's would (fewer than
eager: the partitioner recomputes cheap elementwise ops in the backward rather than saving their outputs);
the backward's temporaries are those of the unfused graph, at most inductor's. Where FSDP2 wraps each block,
its forward hooks, which dynamo skips, split the graph per block; the trace breaks the graph at the same
places. With precision=fp8 the model gets torchao's float8 linears first, as the strategies convert it: the
compiled partition then saves the 1-byte casts of the matmul inputs. (Eager float8 saves the bf16 inputs and
casts again in the backward, so an eager fp8 step is traced as bf16.)
"""

from __future__ import annotations

import contextlib
import copy
import unittest.mock
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker
from transformers import AutoModelForCausalLM, PretrainedConfig, masking_utils

from trainer.activation_checkpointing import Mode, enable_activation_checkpointing
from trainer.models import CausalLMWithLoss, transformer_blocks
from trainer.precision import convert_to_fp8

# AOT autograd with inductor's decompositions and min-cut partitioner, the graphs run without codegen.
COMPILE_BACKEND = "aot_eager_decomp_partition"

# MemTracker's categories that are the step's own tensors rather than the model state (parameters, buffers,
# gradients and optimizer states are planned from the strategy's layout instead).
_ACTIVATION_KINDS = ("ACT", "TEMP", "OTH")


@dataclass
class ActivationTrace:
    """Bytes of one micro-batch's activations: held at the end of the forward, and at the step's peak."""

    saved: float  # what the forward leaves for the backward
    peak: float  # the most held at once over forward and backward (saved ones, their gradients, temporaries)
    # The parameters' gradients already computed at that peak, and all of them (the trace's dtype): with
    # checkpointing the peak comes late in the backward, when many gradients exist.
    grads_at_peak: float = 0.0
    grads_total: float = 1.0

    @property
    def grad_share_at_peak(self) -> float:
        return min(self.grads_at_peak / self.grads_total, 1.0) if self.grads_total else 0.0


@dataclass(frozen=True)
class StepShape:
    """One micro-batch's forward and backward as the strategy runs it: the shapes, the weights' dtype and
    the autocast dtype, checkpointing, the fused loss's chunk, and whether positions restart per document."""

    micro_batch: int
    seq_len: int
    weight_dtype: torch.dtype
    autocast_dtype: torch.dtype | None
    checkpointing: Mode
    loss_chunk_size: int | None
    document_mask: bool = False

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cpu", dtype=self.autocast_dtype)


class CompiledMemTracker(MemTracker):
    """A MemTracker under which torch.compile's code runs: dynamo falls back to eager while a dispatch mode
    is on the stack unless the mode ignores compile internals. The backend's graphs run op by op through the
    dispatcher, so the tracker still sees every tensor they allocate and free."""

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        return True


def compile_as_traced(module: CausalLMWithLoss, *, split_blocks: bool) -> None:
    """Compile `module` in place with the trace's backend; `split_blocks` breaks the graph around each
    transformer block, as FSDP2's forward hooks (which dynamo skips) do in a compiled fsdp run.

    The fused loss runs eagerly: dynamo unrolls its loop over chunks (126 of them for Llama 3's vocabulary
    over 16k tokens: a minute of tracing), and compiled it holds what it holds eagerly. Its forward already
    computes the gradients of the hidden states and the head, and saves just those for its backward, which
    only scales them: there is nothing for the partitioner to recompute, and the chunk's temporaries are
    freed chunk by chunk either way."""
    torch.compiler.reset()  # every trace compiles a fresh module: no stale cache entries, no recompile limit
    if split_blocks:
        graph_break = torch._dynamo.disable(lambda *args: None, reason="FSDP2's hooks are skipped")
        for block in transformer_blocks(module.model):
            block.register_forward_pre_hook(graph_break)
            block.register_forward_hook(graph_break)
    (module.model.base_model if module.fused else module).compile(backend=COMPILE_BACKEND)


def _activation_bytes(snapshot: dict) -> float:
    return float(sum(v for k, v in snapshot.items() if any(str(k).endswith(c) for c in _ACTIVATION_KINDS)))


@contextlib.contextmanager
def fake_loss_module(
    config: PretrainedConfig, num_layers: int, step: StepShape, *, fake: bool = True
) -> Iterator[CausalLMWithLoss]:
    """The trainer's loss module of the model cut to `num_layers` blocks, in training mode, inside a
    FakeTensorMode (no storage; `fake=False`: real weights): checkpointing switched on as trainer/loop.py
    does."""
    config = copy.deepcopy(config)
    config.num_hidden_layers = num_layers
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = list(config.layer_types)[:num_layers]
    # torch's module tracker replaces warnings.formatwarning for good when checkpointing re-enters a module
    # (catch_warnings does not restore it): every later warning of the process would lose our format.
    formatwarning = warnings.formatwarning
    try:
        with FakeTensorMode() if fake else contextlib.nullcontext(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_config(config, dtype=step.weight_dtype)
            enable_activation_checkpointing(model, step.checkpointing)
            module = CausalLMWithLoss(model, loss_chunk_size=step.loss_chunk_size)
            module.train()
            yield module
    finally:
        warnings.formatwarning = formatwarning


def fake_batch(step: StepShape) -> dict[str, Any]:
    """The loss module's arguments for one micro-batch (call inside the fake mode); with document_mask,
    restarting positions, which transformers turns into a block mask (conversations, data.document_mask)."""
    tokens = torch.zeros(step.micro_batch, step.seq_len, dtype=torch.long)
    return {
        "input_ids": tokens,
        "labels": tokens,
        "num_targets": step.micro_batch * step.seq_len,
        "position_ids": tokens if step.document_mask else None,
    }


def attention_as_run(masked: bool) -> contextlib.AbstractContextManager:
    """Without document positions an eager step's positions count up, so transformers finds no packed
    documents and attends causally (SDPA's is_causal, grouped-query heads not repeated). Fake positions
    cannot be read: it would assume packing and build a mask and repeated key/value heads the real step does
    not. Inside this context it takes the real step's path; `masked` (document positions, or a compiled step,
    whose positions dynamo cannot read either) keeps the mask."""
    if masked:
        return contextlib.nullcontext()
    return unittest.mock.patch.object(masking_utils, "find_packed_sequence_indices", _no_packed_documents)


def _no_packed_documents(position_ids: torch.Tensor) -> None:
    return None


def trace_block_count(
    config: PretrainedConfig,
    num_layers: int,
    step: StepShape,
    *,
    compiled: bool = False,
    fp8: bool = False,
    split_blocks: bool = False,
) -> ActivationTrace:
    """Trace one forward and backward of the model cut to `num_layers` blocks, on fake tensors; `compiled`
    compiles it first (with `fp8`: float8 linears; `split_blocks`: a graph per block, see the module doc)."""
    # Compiled, transformers cannot read positions either (dynamo): the real compiled step builds the mask.
    masked = step.document_mask or compiled
    with fake_loss_module(config, num_layers, step) as module, attention_as_run(masked):
        batch = fake_batch(step)
        autocast = step.autocast()
        tracker = MemTracker()
        if compiled:
            if fp8:
                convert_to_fp8(module)
            compile_as_traced(module, split_blocks=split_blocks)
            with autocast:  # compiles outside the tracker (dynamo's own tracing is not the step's)
                module(**batch).backward()
            module.zero_grad(set_to_none=True)
            tracker = CompiledMemTracker()
        tracker.track_external(module)
        with tracker:
            with autocast:
                loss = module(**batch)
            saved = _activation_bytes(_device_snapshot(tracker, "current"))
            loss.backward()
        at_peak = _device_snapshot(tracker, "peak")
        grads = sum(p.numel() * p.element_size() for p in module.parameters())
    peak = _activation_bytes(at_peak)
    grads_at_peak = float(sum(v for k, v in at_peak.items() if str(k).endswith("GRAD")))
    return ActivationTrace(saved=saved, peak=max(peak, saved), grads_at_peak=grads_at_peak, grads_total=grads)


def _device_snapshot(tracker: MemTracker, kind: str) -> dict:
    snapshot = tracker.get_tracker_snapshot(kind)
    return next(iter(snapshot.values()), {})


def trace_activations(
    config: PretrainedConfig, num_layers: int, step: StepShape, **kwargs: bool
) -> ActivationTrace:
    """The activations of the whole model: traced at 1 and 2 blocks, extended linearly to `num_layers`."""
    one = trace_block_count(config, 1, step, **kwargs)
    if num_layers == 1:
        return one
    two = trace_block_count(config, 2, step, **kwargs)
    extra = num_layers - 1
    return ActivationTrace(
        saved=one.saved + extra * (two.saved - one.saved),
        peak=one.peak + extra * max(two.peak - one.peak, 0.0),
        grads_at_peak=one.grads_at_peak + extra * max(two.grads_at_peak - one.grads_at_peak, 0.0),
        grads_total=one.grads_total + extra * (two.grads_total - one.grads_total),
    )
