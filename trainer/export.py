"""Convert any checkpoint (any strategy, any world size) to a consolidated HF export.

    python -m trainer.export CHECKPOINT_DIR OUTPUT_DIR [--run-dir RUN_DIR]

The model is rebuilt on the meta device from the run's resolved config (`RUN_DIR/.hydra/config.yaml`,
RUN_DIR defaulting to the checkpoint's run directory), filled tensor by tensor from the shard files
and written with `save_pretrained` (safetensors) beside the run's tokenizer. No process group and no
GPU are needed.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM

from trainer.data.tokenizer import load_tokenizer
from trainer.distill.wrapper import WRAPPER_ONLY_PREFIX
from trainer.models import build_model_config
from trainer.shards import ShardReader


def _tokenizer(cfg, run_dir: Path):
    built = run_dir / "tokenizer"
    if (built / "tokenizer.json").is_file():
        return load_tokenizer(str(built))
    name = cfg.data.tokenizer or cfg.model.name_or_path
    return load_tokenizer(name, trust_remote_code=cfg.model.trust_remote_code)


def run_config(checkpoint: Path, run_dir: Path | None = None) -> tuple[Any, Path]:
    """The resolved config of the run a checkpoint belongs to, and that run's directory."""
    run_dir = Path(run_dir) if run_dir else Path(checkpoint).parent.parent
    config_file = run_dir / ".hydra" / "config.yaml"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{config_file} not found: pass --run-dir, the run directory the checkpoint belongs to"
        )
    return OmegaConf.load(config_file), run_dir


def model_config(cfg: Any, tokenizer: Any):
    """The transformers config of the model a run trained: from `model.*` or its distillation student's,
    with the smaller shapes of structured pruning."""
    if cfg.get("distill") and cfg.distill.get("student_init", "model") == "teacher_layers":
        from trainer.distill.student import kept_layers, student_config
        from trainer.distill.teacher import teacher_config

        d = cfg.distill
        teacher = teacher_config(d)
        keep = kept_layers(
            teacher.num_hidden_layers, stride=d.student_layer_stride, layers=d.get("student_layers")
        )
        config = student_config(teacher, keep=keep)
    elif cfg.model.source == "pretrained":
        kwargs = {"gguf_file": cfg.model.gguf_file} if cfg.model.gguf_file else {}
        config = AutoConfig.from_pretrained(
            cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code, **kwargs
        )
    else:
        config = build_model_config(cfg.model, vocab_size=len(tokenizer))
    if cfg.get("prune") is not None and cfg.prune.name == "structured":
        from trainer.prune.structured import pruned_config  # the checkpoint holds the smaller shapes

        p = cfg.prune
        config = pruned_config(config, heads=p.heads, mlp_channels=p.mlp_channels, layers=list(p.drop_layers))
    return config


def load_checkpoint_model(
    checkpoint: Path, *, run_dir: Path | None = None, device: str = "meta"
) -> tuple[Any, Any]:
    """The HF model a checkpoint holds, filled from its shards, and its run's tokenizer.

    On the meta device (the default) only the checkpoint's tensors are real: enough to save, not to run.
    Keys that are not the model's (a distillation run's projections) are left out.
    """
    checkpoint = Path(checkpoint)
    cfg, run_dir = run_config(checkpoint, run_dir)
    tokenizer = _tokenizer(cfg, run_dir)
    config = model_config(cfg, tokenizer)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.model.trust_remote_code)
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


def export_checkpoint(checkpoint: Path, output: Path, *, run_dir: Path | None = None) -> None:
    model, tokenizer = load_checkpoint_model(checkpoint, run_dir=run_dir)
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(output), safe_serialization=True)
    tokenizer.save_pretrained(str(output))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="a checkpoints/step_XXXXXXXX directory")
    parser.add_argument("output", type=Path, help="directory to write the HF export into")
    parser.add_argument(
        "--run-dir", type=Path, default=None, help="the run directory (default: the checkpoint's)"
    )
    args = parser.parse_args(argv)
    export_checkpoint(args.checkpoint, args.output, run_dir=args.run_dir)
    print(f"exported {args.checkpoint} to {args.output}")


if __name__ == "__main__":
    main()
