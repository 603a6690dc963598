"""Distillation losses between a student's and a teacher's next-token distributions, computed in chunks of rows.

Every loss compares softmax(z_s / T) with softmax(z_t / T) row by row and is multiplied by T^2 (Hinton et
al.: the gradients of a softened divergence shrink as 1/T^2, so the factor keeps their scale when T
changes). Rows whose label is IGNORE_INDEX (padding, ignored targets) count for nothing, exactly as in the
cross-entropy, and the sum is divided by `num_targets` (the global batch's count of targets).

Like `trainer/loss.py`, logits can be formed from final hidden states and head weights a chunk of rows at a
time, the gradients of the student's hidden states and head computed in the same pass: peak memory is
chunk x vocab, not tokens x vocab, for the teacher's logits as for the student's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.loss import IGNORE_INDEX, auto_chunk_size

LOSSES = ("forward_kl", "reverse_kl", "jsd", "tvd")


def divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    kind: str,
    temperature: float = 1.0,
    beta: float = 0.5,
) -> torch.Tensor:
    """Per-row divergence [N] between the tempered distributions of two [N, V] logit tensors, times T^2.

    forward_kl: KL(t || s); reverse_kl: KL(s || t); jsd: beta KL(t || m) + (1 - beta) KL(s || m) with
    m = beta t + (1 - beta) s (the generalized JSD of Agarwal et al., GKD); tvd: 0.5 sum |t - s|.
    """
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if kind == "forward_kl":
        out = (log_t.exp() * (log_t - log_s)).sum(-1)
    elif kind == "reverse_kl":
        out = (log_s.exp() * (log_s - log_t)).sum(-1)
    elif kind == "jsd":
        # log m by logsumexp, stable where one of the two probabilities underflows.
        log_m = torch.logaddexp(
            log_t + torch.log(torch.tensor(beta)), log_s + torch.log(torch.tensor(1 - beta))
        )
        kl_t = (log_t.exp() * (log_t - log_m)).sum(-1)
        kl_s = (log_s.exp() * (log_s - log_m)).sum(-1)
        out = beta * kl_t + (1 - beta) * kl_s
    elif kind == "tvd":
        out = 0.5 * (log_t.exp() - log_s.exp()).abs().sum(-1)
    else:
        raise ValueError(f"unknown distillation loss {kind!r}; choose one of {', '.join(LOSSES)}")
    return out * temperature**2


def _logits(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    if weight is None:
        return x
    return x @ weight.t() if bias is None else torch.addmm(bias, x, weight.t())


class _ChunkedDistillation(torch.autograd.Function):
    """Forward computes the loss and, when needed, the gradients of the student's inputs chunk by chunk."""

    @staticmethod
    def forward(ctx, s_x, s_w, s_b, t_x, t_w, t_b, labels, chunk, scale, options, need_grad):
        n = s_x.shape[0]
        loss = torch.zeros((), dtype=torch.float32, device=s_x.device)
        student = (s_x, s_w, s_b)
        wants = [need_grad and t is not None and t.requires_grad for t in student]
        grads: list[torch.Tensor | None] = [None, None, None]
        for start in range(0, n, chunk):
            rows = slice(start, start + chunk)
            valid = (labels[rows] != IGNORE_INDEX).float()
            if not valid.any():
                continue
            with torch.no_grad():
                z_t = _logits(t_x[rows], t_w, t_b)
            with torch.enable_grad():
                x = s_x[rows].detach().requires_grad_(wants[0])
                w = None if s_w is None else s_w.detach().requires_grad_(wants[1])
                b = None if s_b is None else s_b.detach().requires_grad_(wants[2])
                part = (divergence(_logits(x, w, b), z_t, **options) * valid).sum()
                which = [i for i in range(3) if wants[i]]
                chunk_grads = (
                    torch.autograd.grad(part * scale, [(x, w, b)[i] for i in which]) if which else ()
                )
            loss += part.detach()
            for i, g in zip(which, chunk_grads, strict=True):
                if i == 0:
                    if grads[0] is None:
                        grads[0] = torch.zeros_like(s_x)
                    grads[0][rows] = g
                else:
                    grads[i] = g.float() if grads[i] is None else grads[i] + g
        if need_grad:
            out = []
            for i, t in enumerate(student):
                g = grads[i]
                if g is None and wants[i]:
                    g = torch.zeros_like(t)
                out.append(None if g is None else g.to(t.dtype))
            ctx.save_for_backward(*[g if g is not None else torch.empty(0) for g in out])
            ctx.present = [g is not None for g in out]
        return loss * scale

    @staticmethod
    def backward(ctx, grad_output):
        saved = ctx.saved_tensors
        out = [
            g.mul_(grad_output.to(g.dtype)) if present else None
            for g, present in zip(saved, ctx.present, strict=True)
        ]
        return (*out, None, None, None, None, None, None, None, None)


def distillation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    *,
    student_weight: torch.Tensor | None = None,
    student_bias: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    chunk_size: int | None = None,
    num_targets: float | None = None,
) -> torch.Tensor:
    """Sum of per-token divergences over non-ignored labels, divided by `num_targets` (default: their count).

    With a `*_weight` given, that side's tensor holds final hidden states [..., D] and its logits are
    x @ weight.T + bias, formed `chunk_size` rows at a time (None: about 64 MiB of logits per chunk; 0: all
    rows at once); without, the tensor already holds the logits [..., V]. Teacher tensors get no gradient.
    """
    labels = labels.reshape(-1)
    if kind not in LOSSES:
        raise ValueError(f"unknown distillation loss {kind!r}; choose one of {', '.join(LOSSES)}")
    denom = num_targets if num_targets is not None else int((labels != IGNORE_INDEX).sum())
    scale = 1.0 / max(denom, 1)
    s_x = student.reshape(-1, student.shape[-1])
    t_x = teacher.reshape(-1, teacher.shape[-1]).detach()
    vocab = student_weight.shape[0] if student_weight is not None else s_x.shape[1]
    teacher_vocab = teacher_weight.shape[0] if teacher_weight is not None else t_x.shape[1]
    if vocab != teacher_vocab:
        raise ValueError(
            f"student logits have {vocab} entries, the teacher's {teacher_vocab}: the vocabularies differ"
        )
    if chunk_size is None:
        chunk_size = auto_chunk_size(vocab)
    chunk = chunk_size if chunk_size > 0 else max(s_x.shape[0], 1)
    options = {"kind": kind, "temperature": float(temperature), "beta": float(beta)}
    need_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (s_x, student_weight, student_bias)
    )
    t_w = None if teacher_weight is None else teacher_weight.detach()
    t_b = None if teacher_bias is None else teacher_bias.detach()
    device_type = s_x.device.type
    if torch.is_autocast_enabled(device_type):
        # Autocast does not reach inside an autograd.Function: cast the matmul inputs as it would (the casts are
        # differentiable, so fp32 weights still get fp32 gradients), as trainer/loss.py does.
        dtype = torch.get_autocast_dtype(device_type)
        cast = [
            None if t is None else t.to(dtype) for t in (s_x, student_weight, student_bias, t_x, t_w, t_b)
        ]
        with torch.autocast(device_type, enabled=False):
            return _ChunkedDistillation.apply(*cast, labels, chunk, scale, options, need_grad)
    return _ChunkedDistillation.apply(
        s_x, student_weight, student_bias, t_x, t_w, t_b, labels, chunk, scale, options, need_grad
    )


def hidden_state_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    *,
    kind: str,
    num_targets: float | None,
) -> torch.Tensor:
    """Per-token distance between (projected) student and teacher hidden states [..., D], summed over
    non-ignored labels and divided by `num_targets`: `mse` is the mean squared difference over the width,
    `cosine` is 1 - cosine similarity."""
    labels = labels.reshape(-1)
    s = student.reshape(-1, student.shape[-1]).float()
    t = teacher.reshape(-1, teacher.shape[-1]).float().detach()
    if kind == "mse":
        per_token = (s - t).pow(2).mean(-1)
    elif kind == "cosine":
        per_token = 1.0 - F.cosine_similarity(s, t, dim=-1)
    else:
        raise ValueError(f"unknown hidden-state loss {kind!r}; choose mse or cosine")
    valid = (labels != IGNORE_INDEX).float()
    denom = num_targets if num_targets is not None else int(valid.sum())
    return (per_token * valid).sum() / max(denom, 1)
