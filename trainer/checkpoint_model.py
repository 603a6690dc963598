"""The model a trainer checkpoint holds: described from its own files, rebuilt and filled from its shards.

Any checkpoint (any strategy, any world size) loads here in one process with no process group and no GPU, and
no distillation or pruning code runs: the checkpoint says what the model is (its config.json and tokenizer).
Checkpoints written before they held config.json are rebuilt from their run's resolved config
(`RUN_DIR/.hydra/config.yaml`, RUN_DIR defaulting to the checkpoint's run directory).

A run directory is data, not code: a model's own code runs only when the caller passes
`trust_remote_code=True` (`--trust-remote-code` / `trust_remote_code=true` on `trainer.export`'s command line,
`model.trust_remote_code=true` on the training command that loads a teacher), never because a stored config or
config.json says so. The stored config's `model.trust_remote_code` is ignored, and the names it holds that
point outside the run directory (the model, the tokenizer, a teacher) are loaded under the same rule.

Here, below the entry points, so that `trainer.export`, the teacher loader and the quantization tools share it
without importing a command.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, NamedTuple

import torch
from omegaconf import OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from trainer.checkpoint import (
    CONFIG_FILE,
    WRAPPER_ONLY_PREFIX,
    checkpoint_problems,
    describes_model,
    find_checkpoint,
    say,
    unverified_note,
)
from trainer.data.tokenizer import load_tokenizer
from trainer.errors import CheckpointError, CorruptFileError, InputNotFoundError
from trainer.models import build_model_config
from trainer.shards import ShardReader
from trainer.utils import loading_from


class ModelDescription(NamedTuple):
    """What the model a checkpoint holds is, without its weights."""

    config: PretrainedConfig
    tokenizer: Any
    trust_remote_code: bool  # building it runs the model's own code from the hub


def describe_checkpoint(
    checkpoint: Path, *, run_dir: Path | None = None, trust_remote_code: bool = False
) -> ModelDescription:
    """The model a checkpoint holds: from its own config.json and tokenizer files, or, for a checkpoint
    written before it held them, rebuilt from its run's resolved config (`run_dir` is read only then)."""
    checkpoint = Path(checkpoint)
    if describes_model(checkpoint):
        with loading_from(str(checkpoint)):
            config = AutoConfig.from_pretrained(checkpoint, trust_remote_code=trust_remote_code)
            tokenizer = load_tokenizer(str(checkpoint), trust_remote_code=trust_remote_code)
        return ModelDescription(config, tokenizer, trust_remote_code)
    cfg, run_dir = _run_config(checkpoint, run_dir, trust_remote_code=trust_remote_code)
    tokenizer = _run_tokenizer(cfg, run_dir)
    return ModelDescription(_run_model_config(cfg, tokenizer), tokenizer, trust_remote_code)


# ---- checkpoints written before they held config.json: the model rebuilt from the run's config ----------


def _run_tokenizer(cfg: Any, run_dir: Path) -> Any:
    trust = cfg.model.trust_remote_code  # the command line's: _run_config replaced the stored value
    built = run_dir / "tokenizer"
    if (built / "tokenizer.json").is_file():
        with loading_from(str(built)):
            return load_tokenizer(str(built), trust_remote_code=trust)
    key = "data.tokenizer" if cfg.data.tokenizer else "model.name_or_path"
    name = cfg.data.tokenizer or cfg.model.name_or_path
    with loading_from(name, key=f"{key} (in {run_dir / '.hydra' / 'config.yaml'})"):
        return load_tokenizer(name, trust_remote_code=trust)


def _run_config(checkpoint: Path, run_dir: Path | None, *, trust_remote_code: bool) -> tuple[Any, Path]:
    """The resolved config of the run a checkpoint belongs to, and that run's directory. Its
    `model.trust_remote_code` is replaced by the command line's: a stored file never lets code run."""
    run_dir = Path(run_dir) if run_dir else Path(checkpoint).parent.parent
    config_file = run_dir / ".hydra" / "config.yaml"
    if not config_file.is_file():
        raise InputNotFoundError(
            f"{checkpoint} has no {CONFIG_FILE} (it was written before checkpoints held one) and {config_file} "
            "was not found: pass --run-dir, the run directory the checkpoint belongs to"
        )
    try:
        cfg = OmegaConf.load(config_file)
        cfg.model.trust_remote_code = trust_remote_code
    except Exception as e:  # not YAML, or not a run's config
        raise CorruptFileError(
            f"{config_file}: not the resolved config of a training run ({' '.join(str(e).split())[:200]}); "
            "pass --run-dir, the run directory the checkpoint belongs to"
        ) from e
    return cfg, run_dir


def _run_model_config(cfg: Any, tokenizer: Any) -> PretrainedConfig:
    """The transformers config of the model a run trained: from `model.*` or its distillation student's,
    with the smaller shapes of structured pruning (the only place export imports distill or prune code)."""
    trust = cfg.model.trust_remote_code  # the command line's: _run_config replaced the stored value
    if cfg.get("distill") and cfg.distill.get("student_init", "model") == "teacher_layers":
        from trainer.distill.student import kept_layers, student_config

        d = cfg.distill
        found = find_checkpoint(d.teacher)
        kwargs = {"gguf_file": d.teacher_gguf_file} if d.get("teacher_gguf_file") else {}
        if found:
            teacher = describe_checkpoint(found, trust_remote_code=trust).config
        else:
            with loading_from(d.teacher, key="distill.teacher (in the run's .hydra/config.yaml)"):
                teacher = AutoConfig.from_pretrained(d.teacher, trust_remote_code=trust, **kwargs)
        keep = kept_layers(
            teacher.num_hidden_layers, stride=d.student_layer_stride, layers=d.get("student_layers")
        )
        config = student_config(teacher, keep=keep)
    elif cfg.model.source == "pretrained":
        kwargs = {"gguf_file": cfg.model.gguf_file} if cfg.model.gguf_file else {}
        with loading_from(cfg.model.name_or_path, key="model.name_or_path (in the run's .hydra/config.yaml)"):
            config = AutoConfig.from_pretrained(cfg.model.name_or_path, trust_remote_code=trust, **kwargs)
    else:
        config = build_model_config(cfg.model, vocab_size=len(tokenizer))
    if OmegaConf.select(cfg, "prune.name") == "structured":  # runs from before the prune group had no key
        from trainer.prune.structured import pruned_config  # the checkpoint holds the smaller shapes

        p = cfg.prune
        config = pruned_config(config, heads=p.heads, mlp_channels=p.mlp_channels, layers=list(p.drop_layers))
    return config


def load_checkpoint_model(
    checkpoint: Path, *, run_dir: Path | None = None, device: str = "meta", trust_remote_code: bool = False
) -> tuple[Any, Any]:
    """The HF model a checkpoint holds, filled from its shards, and its tokenizer.

    On the meta device (the default) only the checkpoint's tensors are real: enough to save, not to run.
    Keys that are not the model's (a distillation run's projections) are left out. `run_dir` is read only
    for a checkpoint without config.json (one written before checkpoints held it). The checkpoint's files are
    verified against its manifest first (every file: the shards hold the optimizer states too), here in one
    process with no process group, so a teacher loaded on each rank is checksummed by each.
    """
    checkpoint = Path(checkpoint)
    problems = checkpoint_problems(checkpoint)
    if problems:
        raise CheckpointError(
            f"{checkpoint} is damaged: {'; '.join(problems)}; use another checkpoints/step_XXXXXXXX of its run"
        )
    if problems is None:
        say(unverified_note(checkpoint), once=True)
    config, tokenizer, trust = describe_checkpoint(
        checkpoint, run_dir=run_dir, trust_remote_code=trust_remote_code
    )
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust)
    reader = ShardReader(checkpoint / "shards")
    state = {
        key.removeprefix("model/"): reader.read(key, 0, math.prod(shape)).view(shape)
        for key, shape in reader.shapes.items()
        if key.startswith("model/") and not key.startswith(f"model/{WRAPPER_ONLY_PREFIX}")
    }
    result = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()  # a tied LM head is not in the checkpoint: it is the embedding
    loaded = {id(p) for name, p in model.named_parameters(remove_duplicate=False) if name in state}
    missing = [k for k in result.missing_keys if id(model.get_parameter(k)) not in loaded]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"checkpoint and model disagree: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    return model, tokenizer


def export_checkpoint(
    checkpoint: Path, output: Path, *, run_dir: Path | None = None, trust_remote_code: bool = False
) -> None:
    model, tokenizer = load_checkpoint_model(checkpoint, run_dir=run_dir, trust_remote_code=trust_remote_code)
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(output), safe_serialization=True)
    tokenizer.save_pretrained(str(output))
