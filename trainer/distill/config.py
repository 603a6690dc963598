"""The distill group's schema (conf/distill/*.yaml) and the checks its types cannot express.

Every default lives in the YAML options, each of which sets every key (tests/test_config.py checks both).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from trainer.choices import Choice
from trainer.errors import ConfigError

# `none` (plain training) or `kd` (teacher -> student distillation).
DistillName = Choice("DistillName", "none kd")
# Divergences between the tempered next-token distributions of teacher and student.
DistillLoss = Choice("DistillLoss", "forward_kl reverse_kl jsd tvd")
# Between (projected) student and teacher hidden states; normalized_mse divides by the teacher's mean square.
HiddenLoss = Choice("HiddenLoss", "mse normalized_mse cosine")
# `model`: the student is what the model group builds or loads; `teacher_layers`: cut from the teacher.
StudentInit = Choice("StudentInit", "model teacher_layers")


@dataclass
class DistillConfig:
    name: DistillName = MISSING
    # The teacher: a HF hub name or directory (an `hf/` export too), or one of our checkpoints
    # (a checkpoints/step_XXXXXXXX directory, its `latest` file, or a run directory).
    teacher: str | None = MISSING
    # GGUF file inside `teacher` (needs the `gguf` extra).
    teacher_gguf_file: str | None = MISSING
    loss: DistillLoss = MISSING
    # Softens both distributions (logits / T); every loss is multiplied by T^2.
    temperature: float = MISSING
    # Weight of the distillation term: loss = (1 - alpha) * cross-entropy + alpha * distillation + hidden.
    alpha: float = MISSING
    # jsd: weight of the teacher in the mixture m = beta * teacher + (1 - beta) * student, in (0, 1).
    beta: float = MISSING
    # Weight of the hidden-state term (0 turns it off).
    hidden_weight: float = MISSING
    hidden_loss: HiddenLoss = MISSING
    # Teacher layer (1-based) for each student layer, in order; null spreads them evenly (last to last).
    layer_map: list[int] | None = MISSING
    # Rows of logits per chunk of the distillation loss; null sizes a chunk at ~64 MiB of logits, 0 all at once.
    chunk_size: int | None = MISSING
    # teacher_layers: the teacher's architecture with every `student_layer_stride`-th layer kept, initialised
    # from those layers.
    student_init: StudentInit = MISSING
    student_layer_stride: int = MISSING
    # teacher_layers: the 0-based teacher layers to keep, in order (null: every student_layer_stride-th).
    student_layers: list[int] | None = MISSING


def register_distill_configs() -> None:
    ConfigStore.instance().store(group="distill", name="schema", node=DistillConfig)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate_distill(d: Any) -> None:
    """The distill group's values (its closed choices Hydra has checked)."""
    if d.name is DistillName.none:
        return
    _check(
        bool(d.teacher), "distill=kd needs distill.teacher: a HF name or directory, or a checkpoint of ours"
    )
    _check(
        d.temperature > 0,
        f"distill.temperature={d.temperature}: must be > 0 (1 leaves the logits as they are)",
    )
    _check(
        0.0 <= d.alpha <= 1.0, f"distill.alpha={d.alpha}: must be in [0, 1] (the distillation term's weight)"
    )
    _check(0.0 < d.beta < 1.0, f"distill.beta={d.beta}: must be in (0, 1) (0 and 1 make the JSD vanish)")
    _check(d.hidden_weight >= 0, f"distill.hidden_weight={d.hidden_weight}: must be >= 0 (0 turns it off)")
    _check(
        d.chunk_size is None or d.chunk_size >= 0, f"distill.chunk_size={d.chunk_size}: must be >= 0 or null"
    )
    _check(
        d.student_layer_stride >= 1,
        f"distill.student_layer_stride={d.student_layer_stride}: must be >= 1 (keep every k-th teacher layer)",
    )
