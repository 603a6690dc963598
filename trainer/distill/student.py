"""The student: the model group's model (from a config or pretrained), or the teacher with every k-th layer kept.

Keeping every k-th transformer block of the teacher (plus its embeddings, final norm and LM head) is how
compact models are commonly started (DistilBERT kept every other layer): the student begins with the
teacher's representations instead of random ones.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from trainer.errors import ConfigError
from trainer.models import build_model, transformer_blocks

_INDEXED = re.compile(r"^(.*)\.(\d+)$")


def kept_layers(num_layers: int, *, stride: int, layers: list[int] | None = None) -> list[int]:
    """0-based teacher layers a student keeps: `layers` as given, else 0, k, 2k, ... for stride k."""
    if layers is None:
        if stride >= num_layers:
            raise ConfigError(
                f"distill.student_layer_stride={stride} keeps 1 of the teacher's {num_layers} layers; "
                f"use a stride below {num_layers}"
            )
        return list(range(0, num_layers, stride))
    keep = [int(i) for i in layers]
    if not keep or keep != sorted(set(keep)) or keep[0] < 0 or keep[-1] >= num_layers:
        raise ConfigError(
            f"distill.student_layers={keep}: must be increasing teacher layer indices in [0, {num_layers - 1}], "
            f"e.g. [0, {num_layers // 2}, {num_layers - 1}]"
        )
    return keep


def student_config(teacher_config: PretrainedConfig, *, keep: list[int]) -> PretrainedConfig:
    """The teacher's config with only the `keep` layers (and no quantization section: GGUF teachers have one,
    and `save_pretrained` refuses a model that claims a quantization it does not have)."""
    config = copy.deepcopy(teacher_config)
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == config.num_hidden_layers:
        config.layer_types = [layer_types[i] for i in keep]  # per-layer attention kinds (sliding/full)
    config.num_hidden_layers = len(keep)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def student_from_teacher(teacher: PreTrainedModel, *, keep: list[int], dtype: torch.dtype) -> PreTrainedModel:
    """A copy of the teacher with the blocks `keep` (renumbered 0, 1, 2, ...), every other weight copied."""
    blocks = {id(m) for m in transformer_blocks(teacher)}
    prefixes = {_INDEXED.match(n).group(1) for n, m in teacher.named_modules() if id(m) in blocks}
    if len(prefixes) != 1:
        raise ConfigError(f"cannot find the list of transformer blocks of {type(teacher).__name__}")
    (prefix,) = prefixes
    renumber = {old: new for new, old in enumerate(keep)}
    state = {}
    for name, tensor in teacher.state_dict().items():
        if name.startswith(prefix + "."):
            index, rest = name[len(prefix) + 1 :].split(".", 1)
            if int(index) not in renumber:
                continue
            name = f"{prefix}.{renumber[int(index)]}.{rest}"
        state[name] = tensor.detach().clone().to(dtype)
    student = AutoModelForCausalLM.from_config(student_config(teacher.config, keep=keep), dtype=dtype)
    student.load_state_dict(state, strict=True)
    return student


def build_student(
    cfg: Any, *, teacher: PreTrainedModel | None, vocab_size: int, dtype: torch.dtype
) -> PreTrainedModel:
    """The student a distillation run trains: with distill.student_init=teacher_layers, cut from the teacher;
    else the model group's."""
    d = cfg.distill
    if d.student_init == "teacher_layers":
        keep = kept_layers(
            teacher.config.num_hidden_layers, stride=d.student_layer_stride, layers=d.get("student_layers")
        )
        return student_from_teacher(teacher, keep=keep, dtype=dtype)
    return build_model(cfg.model, vocab_size=vocab_size, dtype=dtype)
