"""The teacher: loaded from a HF name or directory, a GGUF file, or one of our checkpoints; frozen; run for the student.

A teacher has no gradients and no optimizer state; it runs in eval mode in the run's precision (the
strategy's autocast or FSDP2 mixed-precision policy) and, under `fsdp` and `zero3`, is sharded over the
ranks like the student (FSDP2 `fully_shard` per block, inference only: see `prepare_frozen` in the
strategies), so a teacher larger than one device still fits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from trainer.checkpoint import find_checkpoint
from trainer.checkpoint_model import load_checkpoint_model
from trainer.errors import ConfigError
from trainer.loss import causal_lm_loss
from trainer.models import supports_fused_loss
from trainer.utils import loading_from, require


def checkpoint_dir(teacher: str) -> Path | None:
    """Our checkpoint that `teacher` names (a step directory, a `latest` file or a run directory), else None."""
    found = find_checkpoint(teacher)
    if found is None and (Path(teacher) / "checkpoints").is_dir():
        raise ConfigError(f"distill.teacher={teacher}: the run directory holds no complete checkpoint")
    return found


def _gguf_kwargs(d: Any) -> dict[str, Any]:
    if not d.teacher_gguf_file:
        return {}
    require("gguf", extra="gguf")
    return {"gguf_file": d.teacher_gguf_file}


def load_teacher(
    d: Any, *, dtype: torch.dtype, trust_remote_code: bool = False
) -> tuple[PreTrainedModel, Any]:
    """The frozen teacher (on CPU, in `dtype`) and its tokenizer (None when it has none we can load).

    `trust_remote_code` is the training command's `model.trust_remote_code`: a teacher's own code runs only
    then, never because the teacher's run directory or config.json says so (trainer/checkpoint_model.py)."""
    found = checkpoint_dir(d.teacher)
    if found is not None:
        model, tokenizer = load_checkpoint_model(found, device="cpu", trust_remote_code=trust_remote_code)
        model = model.to(dtype)
    else:
        kwargs = _gguf_kwargs(d)
        with loading_from(d.teacher, key="distill.teacher"):
            model = AutoModelForCausalLM.from_pretrained(
                d.teacher, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs
            )
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                d.teacher, trust_remote_code=trust_remote_code, **kwargs
            )
        except (OSError, ValueError, TypeError):
            tokenizer = None  # weights without a tokenizer: only the logit sizes can be compared
    model.requires_grad_(False)
    model.eval()
    model.config.use_cache = False
    return model, tokenizer


def check_vocabulary(
    teacher: PreTrainedModel, student: PreTrainedModel, *, teacher_tokenizer: Any, tokenizer: Any
) -> None:
    """Distillation compares the two next-token distributions id by id: both must use one vocabulary."""
    t_size = teacher.get_output_embeddings().weight.shape[0]
    s_size = student.get_output_embeddings().weight.shape[0]
    fix = (
        "train the student with the teacher's tokenizer (data.tokenizer=<the teacher's tokenizer>, and a student "
        "whose vocab_size matches) or pick a teacher trained on this tokenizer"
    )
    if t_size != s_size:
        raise ConfigError(
            f"teacher and student vocabularies differ: the teacher predicts {t_size} token ids, the student "
            f"{s_size}; {fix}"
        )
    if teacher_tokenizer is not None and teacher_tokenizer.get_vocab() != tokenizer.get_vocab():
        t_vocab, s_vocab = teacher_tokenizer.get_vocab(), tokenizer.get_vocab()
        differ = sorted(set(t_vocab.items()) ^ set(s_vocab.items()))[:3]
        raise ConfigError(
            f"teacher and student vocabularies differ: the teacher's tokenizer has {len(t_vocab)} tokens, the "
            f"run's {len(s_vocab)}, and they disagree on e.g. {differ}; {fix}"
        )


class TeacherModule(nn.Module):
    """The teacher as strategies see it: `forward(input_ids)` gives (final hidden states or logits, the
    hidden states of `layers`); `head()` gives the LM head's weight and bias while they are needed."""

    def __init__(
        self,
        model: PreTrainedModel,
        *,
        layers: list[int],
        gathered: Callable[[nn.Module], contextlib.AbstractContextManager] | None = None,
    ) -> None:
        """`gathered(module)`: the strategy's context in which a module it placed holds its root parameters whole
        (the LM head of a sharded teacher); None: nothing to gather."""
        super().__init__()
        self.model = model
        self.layers = list(layers)
        self.fused = supports_fused_loss(model)
        self.gathered = gathered or (lambda module: contextlib.nullcontext())

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The teacher's final hidden states (or logits) and the mapped layers' states; `position_ids` as the
        student's, so that it sees the same positions and the same document mask."""
        want = bool(self.layers)
        kwargs = {"input_ids": input_ids, "position_ids": position_ids, "use_cache": False}
        if self.fused:
            out = self.model.base_model(**kwargs, output_hidden_states=want)
            x = out.last_hidden_state
        else:
            out = self.model(**kwargs, output_hidden_states=want)
            x = out.logits
        return x, [out.hidden_states[i] for i in self.layers]

    @contextlib.contextmanager
    def head(self):
        """(weight, bias) of the LM head, gathered while the context lasts when the teacher is sharded;
        (None, None) when the forward already gave logits."""
        if not self.fused:
            yield None, None
            return
        with self.gathered(self):  # a sharded teacher's root holds the head
            head = self.model.get_output_embeddings()
            yield head.weight, head.bias

    @torch.no_grad()
    def eval_loss_sum(
        self, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The teacher's summed token cross-entropy on a batch (for its perplexity beside the student's)."""
        x, _ = self(input_ids, position_ids)
        with self.head() as (weight, bias):
            if weight is None:
                return causal_lm_loss(x, None, None, labels, chunk_size=0, num_targets=1)
            return causal_lm_loss(x, weight, bias, labels, num_targets=1)
