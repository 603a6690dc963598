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


def _forward_kl_and_ce(
    z_s: torch.Tensor,
    z_t: torch.Tensor,
    target: torch.Tensor,
    ce_coef: torch.Tensor,
    kd_coef: torch.Tensor,
    temperature: float,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-row T^2 KL(t || s) and cross-entropy of fp32 logit chunks [n, V], and the gradient of
    sum(ce_coef * ce + kd_coef * kd) with respect to z_s, in closed form and mostly in place (z_s and z_t
    are overwritten): d(T^2 KL)/dz_s = T (softmax(z_s / T) - softmax(z_t / T)), d ce/dz_s = softmax(z_s) -
    onehot. KL(t || s) = sum_v p_t (z_t - z_s) / T - lse(z_t / T) + lse(z_s / T), the sums as dot products."""
    tempered = temperature != 1.0
    target_logit = z_s.gather(1, target[:, None]).squeeze(1)
    lse_s = torch.logsumexp(z_s, dim=1)
    if tempered:
        z_t.div_(temperature)
    lse_t = torch.logsumexp(z_t, dim=1)
    p_t = torch.exp(z_t - lse_t[:, None])
    teacher_dot = _row_dot(p_t, z_t)
    z_st = z_s / temperature if tempered else z_s
    lse_st = torch.logsumexp(z_st, dim=1) if tempered else lse_s
    student_dot = _row_dot(p_t, z_st)
    kd = (teacher_dot - student_dot - lse_t + lse_st) * temperature**2
    ce = lse_s - target_logit
    if not need_grad:
        return ce, kd, None
    # p_t becomes kd_coef T p_t; the student's tempered softmax, times kd_coef T, minus it is the KD part.
    kd_scale = kd_coef * temperature
    p_t.mul_(kd_scale[:, None])
    if tempered:
        grad = z_st.sub_(lse_st[:, None]).exp_().mul_(kd_scale[:, None]).sub_(p_t)
        grad.add_(z_s.sub_(lse_s[:, None]).exp_().mul_(ce_coef[:, None]))
    else:  # one softmax serves both terms
        grad = z_s.sub_(lse_s[:, None]).exp_().mul_((kd_scale + ce_coef)[:, None]).sub_(p_t)
    rows = torch.arange(grad.shape[0], device=grad.device)
    grad[rows, target] -= ce_coef
    return ce, kd, grad


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum(a * b, dim=1) without an [n, V] temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).reshape(-1)


def _ce_and_divergence(
    z_s: torch.Tensor,
    z_t: torch.Tensor,
    target: torch.Tensor,
    ce_coef: torch.Tensor,
    kd_coef: torch.Tensor,
    options: dict,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-row cross-entropy and divergence of fp32 logit chunks, and the gradient of
    sum(ce_coef * ce + kd_coef * divergence) with respect to z_s (closed form for forward KL, else autograd)."""
    if options["kind"] == "forward_kl":
        return _forward_kl_and_ce(z_s, z_t, target, ce_coef, kd_coef, options["temperature"], need_grad)
    with torch.enable_grad():
        z = z_s.requires_grad_(need_grad)
        ce = F.cross_entropy(z, target, reduction="none")
        kd = divergence(z, z_t, **options)
        grad = None
        if need_grad:
            (grad,) = torch.autograd.grad((ce * ce_coef + kd * kd_coef).sum(), z)
    return ce.detach(), kd.detach(), grad


class _ChunkedDistillation(torch.autograd.Function):
    """Forward computes ce_weight * CE + kd_weight * divergence a chunk of rows at a time and, when needed,
    the gradients of the student's inputs in the same pass: the student's logits are formed once for both
    terms and their gradient is taken back through the head by two matmuls. Also returns the two terms
    (no gradient) for logging."""

    @staticmethod
    def forward(
        ctx, s_x, s_w, s_b, t_x, t_w, t_b, labels, chunk, ce_weight, kd_weight, scale, options, need_grad
    ):
        n = s_x.shape[0]
        sums = torch.zeros(2, dtype=torch.float64, device=s_x.device)  # ce, divergence
        wants = [need_grad and t is not None and t.requires_grad for t in (s_x, s_w, s_b)]
        grad_x = torch.zeros_like(s_x) if wants[0] else None
        grad_w = None  # fp32 accumulators, created by the first chunk
        grad_b = None
        for start in range(0, n, chunk):
            rows = slice(start, start + chunk)
            target = labels[rows]
            valid = target != IGNORE_INDEX
            if not valid.any():
                continue
            x = s_x[rows]
            # Copies where the logits are the caller's tensors: the chunk buffers are overwritten in place.
            z_s = _logits(x, s_w, s_b).to(torch.float32, copy=s_w is None)
            z_t = _logits(t_x[rows], t_w, t_b).to(torch.float32, copy=t_w is None)
            coef = valid.float() * scale
            ce, kd, grad = _ce_and_divergence(
                z_s,
                z_t,
                torch.where(valid, target, 0),
                coef * ce_weight,
                coef * kd_weight,
                options,
                need_grad,
            )
            sums += torch.stack([(ce * valid).sum(), (kd * valid).sum()]).double()
            if grad is None:
                continue
            g = grad.to(s_x.dtype)
            if s_w is None:
                grad_x[rows] = g
                continue
            if wants[0]:
                torch.mm(g, s_w, out=grad_x[rows])
            if wants[1]:
                part = (g.t() @ x).float()
                grad_w = part if grad_w is None else grad_w.add_(part)
            if wants[2]:
                part = grad.sum(0)
                grad_b = part if grad_b is None else grad_b.add_(part)
        if need_grad:
            out = [grad_x, grad_w, grad_b]
            for i, t in enumerate((s_x, s_w, s_b)):
                if wants[i] and out[i] is None:
                    out[i] = torch.zeros_like(t)
                out[i] = None if out[i] is None else out[i].to(t.dtype)
            ctx.save_for_backward(*[g if g is not None else torch.empty(0) for g in out])
            ctx.present = [g is not None for g in out]
        ce_mean, kd_mean = (sums * scale).float().unbind()
        loss = ce_weight * ce_mean + kd_weight * kd_mean
        ctx.mark_non_differentiable(ce_mean, kd_mean)
        return loss, ce_mean, kd_mean

    @staticmethod
    def backward(ctx, grad_output, _grad_ce, _grad_kd):
        saved = ctx.saved_tensors
        out = [
            g.mul_(grad_output.to(g.dtype)) if present else None
            for g, present in zip(saved, ctx.present, strict=True)
        ]
        return (*out, *[None] * 10)


def mixed_distillation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float,
    student_weight: torch.Tensor | None = None,
    student_bias: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    chunk_size: int | None = None,
    num_targets: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(1 - alpha) * cross-entropy + alpha * divergence, with the cross-entropy and the divergence
    (detached) beside it: each a sum over non-ignored labels divided by `num_targets` (default: their count).

    With a `*_weight` given, that side's tensor holds final hidden states [..., D] and its logits are
    x @ weight.T + bias, formed `chunk_size` rows at a time (None: about 64 MiB of logits per chunk; 0: all
    rows at once); without, the tensor already holds the logits [..., V]. The student's logits are formed
    once for both terms. Teacher tensors get no gradient.
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
    args = [s_x, student_weight, student_bias, t_x, t_w, t_b]
    rest = (labels, chunk, 1.0 - alpha, float(alpha), scale, options, need_grad)
    device_type = s_x.device.type
    if torch.is_autocast_enabled(device_type):
        # Autocast does not reach inside an autograd.Function: cast the matmul inputs as it would (the casts are
        # differentiable, so fp32 weights still get fp32 gradients), as trainer/loss.py does.
        dtype = torch.get_autocast_dtype(device_type)
        args = [None if t is None else t.to(dtype) for t in args]
        with torch.autocast(device_type, enabled=False):
            return _ChunkedDistillation.apply(*args, *rest)
    return _ChunkedDistillation.apply(*args, *rest)


def distillation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    **options,
) -> torch.Tensor:
    """The divergence term of `mixed_distillation_loss` alone (alpha = 1), with its gradient."""
    return mixed_distillation_loss(student, teacher, labels, alpha=1.0, **options)[0]


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
    `normalized_mse` that divided by the teacher's mean square, `cosine` is 1 - cosine similarity."""
    labels = labels.reshape(-1)
    s = student.reshape(-1, student.shape[-1]).float()
    t = teacher.reshape(-1, teacher.shape[-1]).float().detach()
    if kind == "mse":
        per_token = (s - t).pow(2).mean(-1)
    elif kind == "normalized_mse":
        # The teacher's own mean square as the unit (the SquareHead loss of Kurtic et al.): every layer and
        # token counts alike, however large the norms of pretrained models' hidden states grow.
        per_token = (s - t).pow(2).mean(-1) / t.pow(2).mean(-1).clamp_min(1e-12)
    elif kind == "cosine":
        per_token = 1.0 - F.cosine_similarity(s, t, dim=-1)
    else:
        raise ValueError(f"unknown hidden-state loss {kind!r}; choose mse, normalized_mse or cosine")
    valid = (labels != IGNORE_INDEX).float()
    denom = num_targets if num_targets is not None else int(valid.sum())
    return (per_token * valid).sum() / max(denom, 1)
