"""Hidden-state distillation: which teacher layer each student layer imitates, and the projections between widths."""

from __future__ import annotations

from torch import nn

from trainer.errors import ConfigError


def default_layer_map(num_student_layers: int, num_teacher_layers: int) -> list[int]:
    """Teacher layer (1-based) per student layer, spread evenly so that the last imitates the last.

    Student layer i of S takes teacher layer round(i * T / S): 2 of 4 -> [2, 4], 3 of 4 -> [1, 3, 4].
    """
    return [
        max(1, round(i * num_teacher_layers / num_student_layers)) for i in range(1, num_student_layers + 1)
    ]


def resolve_layer_map(
    layer_map: list[int] | None, *, num_student_layers: int, num_teacher_layers: int
) -> list[int]:
    """The configured map checked against both depths, or the default one."""
    if layer_map is None:
        return default_layer_map(num_student_layers, num_teacher_layers)
    layer_map = [int(x) for x in layer_map]
    if len(layer_map) != num_student_layers:
        raise ConfigError(
            f"distill.layer_map={layer_map} has {len(layer_map)} entries but the student has {num_student_layers} "
            f"layers; give one teacher layer (1..{num_teacher_layers}) per student layer, or null for the default"
        )
    bad = [x for x in layer_map if not 1 <= x <= num_teacher_layers]
    if bad:
        raise ConfigError(
            f"distill.layer_map={layer_map}: teacher layers {bad} do not exist; the teacher has layers "
            f"1..{num_teacher_layers}"
        )
    return layer_map


def build_projections(student_width: int, teacher_width: int, count: int) -> nn.ModuleList:
    """One linear map student width -> teacher width per mapped layer (identities when the widths agree).

    They train with the student and are saved in checkpoints, never in the `hf/` export.
    """
    if student_width == teacher_width:
        return nn.ModuleList([nn.Identity() for _ in range(count)])
    return nn.ModuleList([nn.Linear(student_width, teacher_width, bias=False) for _ in range(count)])
