"""The module the strategies wrap in a distillation run: the student, its projections, and the mixed loss.

Its forward takes the teacher's outputs (computed beforehand under no_grad, see `trainer/distill/teacher.py`)
as an argument, so the teacher is never a submodule: strategies shard, checkpoint and export the student
and its projections only. The projections are the one thing it adds to the state (`distill_projections.*`),
kept in checkpoints and left out of the `hf/` export.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PreTrainedModel

from trainer.checkpoint import WRAPPER_ONLY_PREFIX as WRAPPER_ONLY_PREFIX  # defined by the checkpoint format
from trainer.distill.losses import hidden_state_loss, mixed_distillation_loss
from trainer.models import CausalLMWithLoss

TERMS = ("ce_loss", "kd_loss", "hidden_loss")


@dataclass
class TeacherOutputs:
    """What the student's loss needs from the teacher: final hidden states with the LM head's weight and bias
    (or logits, with weight None), and the hidden states of the layers the student imitates."""

    x: torch.Tensor
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    states: list[torch.Tensor] = field(default_factory=list)


class DistillationModule(CausalLMWithLoss):
    """Student plus projections; with `teacher` given, the forward returns
    (1 - alpha) * CE + alpha * distillation + hidden_weight * hidden-state loss, each over the global batch."""

    def __init__(
        self,
        model: PreTrainedModel,
        *,
        loss_chunk_size: int | None,
        kind: str,
        temperature: float,
        beta: float,
        alpha: float,
        chunk_size: int | None,
        hidden_weight: float = 0.0,
        hidden_loss: str = "mse",
        layer_map: list[int] | None = None,
        projections: nn.ModuleList | None = None,
    ) -> None:
        super().__init__(model, loss_chunk_size=loss_chunk_size)
        self.options = {"kind": kind, "temperature": temperature, "beta": beta, "chunk_size": chunk_size}
        self.alpha, self.hidden_weight, self.hidden_loss = alpha, hidden_weight, hidden_loss
        self.layer_map = list(layer_map or [])
        if hidden_weight > 0:
            self.distill_projections = projections
        # Sums of each term over this step's micro-batches (detached), read and reset by the Distillation.
        self.term_sums: torch.Tensor | None = None

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        num_targets: float | None = None,
        position_ids: torch.Tensor | None = None,
        teacher: TeacherOutputs | None = None,
    ) -> torch.Tensor:
        if teacher is None:  # evaluation: the student's own cross-entropy
            return super().forward(input_ids, labels, num_targets, position_ids)
        want_states = self.hidden_weight > 0
        if self.fused:
            out = self.model.base_model(
                input_ids=input_ids,
                position_ids=position_ids,
                use_cache=False,
                output_hidden_states=want_states,
            )
            x = out.last_hidden_state
            head = self.model.get_output_embeddings()
            weight, bias = head.weight, head.bias
        else:
            out = self.model(
                input_ids=input_ids,
                position_ids=position_ids,
                use_cache=False,
                output_hidden_states=want_states,
            )
            x, weight, bias = out.logits, None, None
        # One pass over the student's logits gives both terms (and the gradient of their mix).
        loss, ce, kd = mixed_distillation_loss(
            x,
            teacher.x,
            labels,
            alpha=self.alpha,
            student_weight=weight,
            student_bias=bias,
            teacher_weight=teacher.weight,
            teacher_bias=teacher.bias,
            num_targets=num_targets,
            **self.options,
        )
        hidden = torch.zeros((), device=ce.device)
        if want_states:
            # hidden_states[i] is the output of student layer i (0: the embeddings).
            pairs = zip(self.distill_projections, teacher.states, strict=True)
            for i, (proj, target) in enumerate(pairs, start=1):
                student_state = proj(out.hidden_states[i])
                hidden = hidden + hidden_state_loss(
                    student_state, target, labels, kind=self.hidden_loss, num_targets=num_targets
                )
            hidden = hidden / len(self.layer_map)
            loss = loss + self.hidden_weight * hidden
        terms = torch.stack([ce.detach(), kd.detach(), hidden.detach()]).double()
        self.term_sums = terms if self.term_sums is None else self.term_sums + terms
        return loss
