"""Knowledge distillation as a loop extension (`distill=kd`; see trainer/extensions.py for the hooks).

`Distillation` loads the teacher when it is made, builds the student (`build_model`), wraps it with the mixed
loss (`wrap_loss`), has the strategy place the frozen teacher like the student (`after_setup`), runs the
teacher before each student forward (`forward_inputs`), and adds the loss terms and the teacher's eval loss
to the metrics. See losses.py, teacher.py, student.py, hidden.py and wrapper.py.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from transformers import PreTrainedModel

from trainer.distill.hidden import build_projections, resolve_layer_map
from trainer.distill.student import build_student
from trainer.distill.teacher import TeacherModule, check_vocabulary, load_teacher
from trainer.distill.wrapper import TERMS, DistillationModule, TeacherOutputs
from trainer.distributed import all_gather_ints, all_reduce_sum
from trainer.extensions import Extension


class Distillation(Extension):
    """Teacher -> student distillation; the teacher is loaded at construction, before the student is built."""

    name = "distill"

    def __init__(
        self, cfg: Any, *, tokenizer: Any, dtype: torch.dtype, env: Any, device: torch.device
    ) -> None:
        self.run_cfg = cfg
        self.cfg, self.tokenizer, self.env, self.device = cfg.distill, tokenizer, env, device
        self.teacher_model, self.teacher_tokenizer = load_teacher(
            cfg.distill, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code
        )
        self.teacher: TeacherModule | None = None
        self.student: DistillationModule | None = None
        self._eval_sums = torch.zeros(2, dtype=torch.float64, device=device)
        self._teacher_eval: dict[str, float] | None = None

    def build_model(self, *, vocab_size: int, dtype: torch.dtype) -> PreTrainedModel:
        """The student: the model group's model, or layers cut from the teacher (distill.student_init)."""
        return build_student(self.run_cfg, teacher=self.teacher_model, vocab_size=vocab_size, dtype=dtype)

    def wrap_loss(
        self, model: PreTrainedModel, *, loss_chunk_size: int | None, seed: int
    ) -> DistillationModule:
        """The student with the mixed loss (and projections); fails here when the vocabularies differ."""
        d, teacher = self.cfg, self.teacher_model
        check_vocabulary(teacher, model, teacher_tokenizer=self.teacher_tokenizer, tokenizer=self.tokenizer)
        layer_map, projections = [], None
        if d.hidden_weight > 0:
            layer_map = resolve_layer_map(
                d.layer_map,
                num_student_layers=model.config.num_hidden_layers,
                num_teacher_layers=teacher.config.num_hidden_layers,
            )
            torch.manual_seed(seed)  # identical projections on every rank
            projections = build_projections(
                model.config.hidden_size, teacher.config.hidden_size, len(layer_map)
            ).to(next(model.parameters()).dtype)
        self.layer_map = layer_map
        self.student = DistillationModule(
            model,
            loss_chunk_size=loss_chunk_size,
            kind=d.loss,
            temperature=d.temperature,
            beta=d.beta,
            alpha=d.alpha,
            chunk_size=d.chunk_size,
            hidden_weight=d.hidden_weight,
            hidden_loss=d.hidden_loss,
            layer_map=layer_map,
            projections=projections,
        )
        return self.student

    def after_setup(self, strategy: Any, module: torch.nn.Module, optimizer: Any) -> None:
        """The teacher placed by the strategy: on the device, or sharded like the student (fsdp, zero3)."""
        self.strategy = strategy
        teacher = TeacherModule(self.teacher_model, layers=self.layer_map, gathered=strategy.gathered)
        self.teacher = strategy.prepare_frozen(teacher)
        self.teacher_numel = sum(p.numel() for p in self.teacher_model.parameters())
        self.teacher_model = None  # the prepared module holds it (sharded, perhaps); drop the name

    @contextlib.contextmanager
    def forward_inputs(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None
    ) -> Iterator[dict[str, Any]]:
        """The teacher's outputs for the student's forward, under no_grad; a sharded head is gathered meanwhile."""
        with torch.no_grad():
            x, states = self.teacher(input_ids, position_ids)
        with self.teacher.head() as (weight, bias):
            yield {"teacher": TeacherOutputs(x, weight, bias, states)}

    def step_metrics(self) -> dict[str, Any]:
        """Each loss term over the last step (all ranks), and the teacher parameters each rank holds."""
        sums = self.student.term_sums
        self.student.term_sums = None
        if sums is None:
            sums = torch.zeros(len(TERMS), dtype=torch.float64, device=self.device)
        # Each rank's terms are its share of the global mean x world size (DDP scaling), as the loss.
        sums = all_reduce_sum(sums.to(self.device)) / self.env.world_size
        out: dict[str, Any] = dict(zip(TERMS, sums.tolist(), strict=True))
        if self.cfg.hidden_weight == 0:
            out.pop("hidden_loss")
        out["teacher_params"] = self.teacher_numel
        out["teacher_params_per_rank"] = all_gather_ints(self.strategy.local_numel(self.teacher), self.device)
        return out

    def eval_batch(
        self, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor | None = None
    ) -> None:
        if self._teacher_eval is not None:
            return  # a frozen teacher on the same eval split: measured once
        self._eval_sums[0] += self.teacher.eval_loss_sum(input_ids, labels, position_ids).double()
        self._eval_sums[1] += int((labels != -100).sum())

    def eval_metrics(self) -> dict[str, float]:
        """The teacher's loss and perplexity on the eval split, beside the student's."""
        if self._teacher_eval is None:
            sums = all_reduce_sum(self._eval_sums.clone())
            loss = (sums[0] / sums[1]).item()
            self._teacher_eval = {"teacher_eval_loss": loss, "teacher_eval_ppl": math.exp(min(loss, 50.0))}
        return dict(self._teacher_eval)
