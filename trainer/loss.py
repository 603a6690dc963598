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

IGNORE_INDEX = -100


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_size: int, scale: float, need_grad: bool):
        n = hidden.shape[0]
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_grad else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if (need_grad and bias is not None) else None
        for start in range(0, n, chunk_size):
            h = hidden[start : start + chunk_size]
            target = labels[start : start + chunk_size]
            logits = (h @ weight.t() if bias is None else torch.addmm(bias, h, weight.t())).float()
            valid = target != IGNORE_INDEX
            safe_target = torch.where(valid, target, 0)
            lse = torch.logsumexp(logits, dim=-1)
            target_logit = logits.gather(1, safe_target[:, None]).squeeze(1)
            loss += ((lse - target_logit) * valid).sum()
            if need_grad:
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place over the logits
                rows = torch.arange(h.shape[0], device=h.device)
                probs[rows, safe_target] -= valid.float()
                probs.mul_((valid.float() * scale)[:, None])
                g = probs.to(hidden.dtype)
                grad_hidden[start : start + chunk_size] = g @ weight
                if weight.dtype == torch.float32:
                    grad_weight.addmm_(probs.t(), h)
                else:  # low-precision matmul, fp32 accumulation across chunks
                    grad_weight.add_((g.t() @ h).float())
                if grad_bias is not None:
                    grad_bias += probs.sum(0)
        if need_grad:
            ctx.save_for_backward(
                grad_hidden,
                grad_weight.to(weight.dtype),
                None if grad_bias is None else grad_bias.to(bias.dtype),
            )
        return loss * scale

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        return (
            grad_hidden * grad_output.to(grad_hidden.dtype),
            grad_weight * grad_output.to(grad_weight.dtype),
            None if grad_bias is None else grad_bias * grad_output.to(grad_bias.dtype),
            None,
            None,
            None,
            None,
        )


def causal_lm_loss(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    chunk_size: int = 2048,
    num_targets: int | None = None,
) -> torch.Tensor:
    """Token cross-entropy summed over non-ignored labels and divided by `num_targets` (default: their count).

    With `weight` given, `x` holds final hidden states [..., D] and the logits x @ weight.T + bias are
    formed a chunk at a time; with `weight=None`, `x` is already the logits [..., V]. `labels` are the
    next-token ids aligned with `x` (already shifted), IGNORE_INDEX where no loss is taken.
    """
    labels = labels.reshape(-1)
    denom = num_targets if num_targets is not None else int((labels != IGNORE_INDEX).sum())
    scale = 1.0 / max(denom, 1)
    if weight is None:
        logits = x.reshape(-1, x.shape[-1]).float()
        return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum") * scale
    hidden = x.reshape(-1, x.shape[-1])
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    chunk = chunk_size if chunk_size > 0 else hidden.shape[0]
    return _FusedLinearCrossEntropy.apply(hidden, weight, bias, labels, chunk, scale, need_grad)
