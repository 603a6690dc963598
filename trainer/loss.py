"""Cross-entropy for causal LMs that never materialises the full [tokens, vocab] logits.

The LM head and the loss are fused and processed a chunk of rows at a time; the gradients of the hidden
states and of the head are computed in the same pass (softmax minus one-hot is the gradient of the
logits), so the backward pass only scales them. Peak memory for the loss is chunk x vocab instead of
tokens x vocab x (logits + log-softmax + its gradient), which is where small models with large
vocabularies spend most of their memory and a good part of their time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake

IGNORE_INDEX = -100


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, hidden, weight, bias, labels, chunk_size: int, scale: float, needs: tuple[bool, bool, bool]
    ):
        # needs: whether hidden, weight and bias want gradients. A frozen LM head (LoRA and QLoRA freeze it)
        # gets none: no [vocab, hidden] accumulator, and a third fewer matmuls.
        need_hidden, need_weight, need_bias = needs[0], needs[1], needs[2] and bias is not None
        n = hidden.shape[0]
        fp32 = weight.dtype == torch.float32
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = None  # fp32 accumulator, created by the first chunk's matmul
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need_bias else None
        for start in range(0, n, chunk_size):
            h = hidden[start : start + chunk_size]
            target = labels[start : start + chunk_size]
            logits = (h @ weight.t() if bias is None else torch.addmm(bias, h, weight.t())).float()
            valid = (target != IGNORE_INDEX).float()
            safe_target = torch.where(target != IGNORE_INDEX, target, 0)
            target_logit = logits.gather(1, safe_target[:, None]).squeeze(1)
            # log-sum-exp and softmax in place over the one chunk buffer: no extra [chunk, vocab] tensors.
            row_max = logits.amax(dim=1, keepdim=True)
            exp = logits.sub_(row_max).exp_()
            total = exp.sum(dim=1, keepdim=True)
            lse = (row_max + total.log()).squeeze(1)
            loss += ((lse - target_logit) * valid).sum()
            if not (need_hidden or need_weight or need_bias):
                continue
            # d loss / d logits = (softmax - onehot) * weight of the row
            coef = valid * scale
            grad_logits = exp.mul_(coef[:, None] / total)
            rows = torch.arange(h.shape[0], device=h.device)
            grad_logits[rows, safe_target] -= coef
            g = grad_logits if fp32 else grad_logits.to(hidden.dtype)
            if need_hidden:
                torch.mm(g, weight, out=grad_hidden[start : start + chunk_size])
            if need_weight:
                chunk_grad = g.t() @ h
                if grad_weight is None:
                    grad_weight = chunk_grad if fp32 else chunk_grad.float()
                else:
                    grad_weight += chunk_grad
            if need_bias:
                grad_bias += grad_logits.sum(0)
        if need_weight and grad_weight is None:
            grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        ctx.save_for_backward(
            grad_hidden,
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
        )
        return loss * scale

    @staticmethod
    def backward(ctx, grad_output):
        grads = ctx.saved_tensors  # hidden's, weight's and bias's, None where not wanted
        # The saved gradients are ours alone: scale them in place (grad_output is 1 for a plain .backward()).
        for grad in grads:
            if grad is not None:
                grad.mul_(grad_output.to(grad.dtype))
        return *grads, None, None, None, None


def auto_chunk_size(vocab_size: int, *, target_bytes: int = 64 * 2**20) -> int:
    """Rows per chunk so that one chunk of fp32 logits takes about `target_bytes` (measured fastest on CPU)."""
    return max(128, target_bytes // (4 * vocab_size))


def causal_lm_loss(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    chunk_size: int | None = None,
    num_targets: int | None = None,
) -> torch.Tensor:
    """Token cross-entropy summed over non-ignored labels and divided by `num_targets` (default: their count).

    With `weight` given, `x` holds final hidden states [..., D] and the logits x @ weight.T + bias are
    formed `chunk_size` rows at a time (None: about 64 MiB of logits per chunk; 0: all at once), for the rows
    with a target only; with `weight=None`, `x` is already the logits [..., V]. `labels` are the
    next-token ids aligned with `x` (already shifted), IGNORE_INDEX where no loss is taken.
    """
    labels = labels.reshape(-1)
    denom = num_targets if num_targets is not None else int((labels != IGNORE_INDEX).sum())
    scale = 1.0 / max(denom, 1)
    if weight is None:
        logits = x.reshape(-1, x.shape[-1]).float()
        return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum") * scale
    hidden = x.reshape(-1, x.shape[-1])
    if not torch.compiler.is_compiling() and not is_fake(labels):
        # Only the rows that carry a target go through the LM head: an SFT batch trains a fraction of its
        # tokens (an assistant's), padding none. (Under compile the row count would be a dynamic shape; on
        # the fake tensors trainer.plan traces, a value nobody has.)
        keep = labels != IGNORE_INDEX
        if not bool(keep.all()):
            hidden, labels = hidden[keep], labels[keep]
    grad_on = torch.is_grad_enabled()
    needs = (
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
    )
    if chunk_size is None:
        chunk_size = auto_chunk_size(weight.shape[0])
    chunk = chunk_size if chunk_size > 0 else hidden.shape[0]
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        # Autocast does not reach inside an autograd.Function: cast the inputs as autocast would for a matmul
        # (the casts are differentiable, so the fp32 weights still get fp32 gradients) and run it as is.
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        with torch.autocast(device_type, enabled=False):
            return _FusedLinearCrossEntropy.apply(hidden, weight, bias, labels, chunk, scale, needs)
    return _FusedLinearCrossEntropy.apply(hidden, weight, bias, labels, chunk, scale, needs)
