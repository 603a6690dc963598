"""Write a model in another format: an HF directory, a llama.cpp GGUF file, or compressed-tensors.

    python -m trainer.export model_path=DIR format=hf|gguf|compressed_tensors output_dir=OUT \
        [overwrite=false] [gguf.type=f32|f16|bf16|q8_0|q4_0] [scheme=w8a16|w8a8|w4a16] [trust_remote_code=false]
    python -m trainer.export CHECKPOINT_DIR OUTPUT_DIR [--run-dir RUN_DIR] [--trust-remote-code]

The first form (conf/export.yaml, schema in trainer/export_config.py) takes an hf/ export, a checkpoint or a
run directory (its latest checkpoint, else its hf/), and writes OUT through a staging directory beside it that
is renamed at the end: a failed export leaves nothing under OUT, and an OUT that exists and is not empty is
refused unless overwrite=true. Each format is one function in EXPORTERS, `(model, tokenizer, staging_dir,
cfg)`, its module imported when it is asked for: hf (`save_pretrained`), gguf (trainer/gguf_export.py) and
compressed_tensors (`trainer.quant.compressed_tensors.export_compressed_tensors`).

The second form, as before, is format=hf of one checkpoint (any strategy, any world size), written into
OUTPUT_DIR as it is; `--run-dir` is read only for a checkpoint written before checkpoints held config.json
(trainer/checkpoint_model.py). In both forms a model's own code runs only when this command line asks for it
(`--trust-remote-code`, `trust_remote_code=true`), never because a stored config says so.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from trainer import checkpoint_model
from trainer.checkpoint import STATE_FILE, checkpoint_problems, find_checkpoint
from trainer.checkpoint_model import ModelDescription, describe_checkpoint, load_checkpoint_model
from trainer.cli import run
from trainer.data.prepared import Batch
from trainer.errors import CheckpointError, ConfigError, InputNotFoundError
from trainer.export_config import validate_export
from trainer.utils import check_output_dir, loading_from, staged

__all__ = [  # the checkpoint functions this module has always offered (now in trainer/checkpoint_model.py)
    "EXPORTERS",
    "ModelDescription",
    "export_adapters",
    "describe_checkpoint",
    "export",
    "export_checkpoint",
    "load_checkpoint_model",
    "main",
]

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


# ---- the formats: (model, tokenizer, staging directory, cfg) -> None, each module imported when asked -------


def _write_hf(model: Any, tokenizer: Any, out: Path, cfg: Any) -> None:
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))


def _write_gguf(model: Any, tokenizer: Any, out: Path, cfg: Any) -> None:
    from trainer.gguf_export import export_gguf

    keep = cfg.gguf.keep_float
    export_gguf(
        model,
        tokenizer,
        out,
        gguf_type=str(cfg.gguf.type),
        name=Path(cfg.model_path).resolve().name,
        keep_float=None if keep is None else list(keep),
    )


def _write_compressed_tensors(model: Any, tokenizer: Any, out: Path, cfg: Any) -> None:
    from trainer.quant.compressed_tensors import export_compressed_tensors

    export_compressed_tensors(
        model, tokenizer, out, scheme=str(cfg.scheme), calibration=calibration_batches(cfg, tokenizer)
    )


EXPORTERS: dict[str, Callable[[Any, Any, Path, Any], None]] = {
    "hf": _write_hf,
    "gguf": _write_gguf,
    "compressed_tensors": _write_compressed_tensors,
}


def calibration_batches(cfg: Any, tokenizer: Any) -> list[Batch]:
    """The first calibration.batches x calibration.batch_size training sequences of the data group, tokenized
    with the model's own tokenizer: `trainer.calibration` Batches of [batch_size, data.seq_len] token ids (and
    their documents' position ids where the data packs several)."""
    from trainer.calibration import data_calibration_batches

    c = cfg.calibration
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return data_calibration_batches(
            cfg.data, tokenizer=tmp, num_batches=c.batches, batch_size=c.batch_size
        )


# ---- the Hydra form ---------------------------------------------------------------------------------------


def export(cfg: Any) -> Path:
    """Export cfg.model_path in cfg.format to cfg.output_dir; returns the path written."""
    validate_export(cfg)
    source = resolve_model_path(Path(cfg.model_path))
    output = Path(cfg.output_dir)
    check_export_dir(output, source=source, overwrite=cfg.overwrite)
    start, named = time.perf_counter(), source
    with contextlib.ExitStack() as stack:
        if is_adapter_checkpoint(source):  # the merged model is what the formats take
            merged = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            export_adapters(source, merged, trust_remote_code=cfg.trust_remote_code)
            if cfg.format == "hf":  # the merged model and adapter/, as the training run writes them
                with staged(output) as staging:
                    shutil.copytree(merged, staging, dirs_exist_ok=True)
                return _report(cfg, named, output, start)
            source = merged
        model, tokenizer = load_model(
            source, trust_remote_code=cfg.trust_remote_code, runnable=cfg.format != "hf"
        )
        with staged(output) as staging:
            EXPORTERS[str(cfg.format)](model, tokenizer, staging, cfg)
    return _report(cfg, named, output, start)


def _report(cfg: Any, source: Path, output: Path, start: float) -> Path:
    written = sorted(p for p in output.rglob("*") if p.is_file())
    size = sum(p.stat().st_size for p in written)
    what = f"{cfg.format}" + {"gguf": f" {cfg.gguf.type}", "compressed_tensors": f" {cfg.scheme}"}.get(
        str(cfg.format), ""
    )
    shown = written[0] if len(written) == 1 else output
    print(
        f"exported {source} ({what}) in {time.perf_counter() - start:.1f}s: {size / 1e6:.2f} MB -> {shown}",
        flush=True,
    )
    return output


def resolve_model_path(path: Path) -> Path:
    """The checkpoint or HF directory `path` names: itself, or for a run directory its latest checkpoint,
    else its hf/ export."""
    if not path.exists():
        raise InputNotFoundError(
            f"model_path={path}: no such file or directory; give a run's hf/ export, one of its "
            "checkpoints/step_XXXXXXXX directories or the run directory"
        )
    found = find_checkpoint(path)
    if found is not None:
        return found
    if (path / "config.json").is_file():
        return path
    if (path / "hf" / "config.json").is_file():
        return path / "hf"
    raise InputNotFoundError(
        f"model_path={path}: not a model (no config.json, no {STATE_FILE}, no checkpoints/ or hf/); give a "
        "run's hf/ export, one of its checkpoints/step_XXXXXXXX directories or the run directory"
    )


def check_export_dir(output: Path, *, source: Path, overwrite: bool) -> None:
    """Not a file, not the model exported nor a directory holding it, and empty unless overwrite."""
    check_output_dir("output_dir", output, source=source)
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise ConfigError(
            f"output_dir={output} exists and is not empty; give another directory, or overwrite=true to "
            "replace it"
        )


def load_model(source: Path, *, trust_remote_code: bool, runnable: bool) -> tuple[Any, Any]:
    """The model and tokenizer of a checkpoint or an HF directory, in float32 on the CPU (a checkpoint's on
    the meta device where it is only saved, not `runnable`: only its stored tensors are real then)."""
    if (source / STATE_FILE).is_file():
        model, tokenizer = load_checkpoint_model(
            source, device="cpu" if runnable else "meta", trust_remote_code=trust_remote_code
        )
        return model.eval(), tokenizer
    from transformers import AutoModelForCausalLM

    from trainer.data.tokenizer import load_tokenizer

    with loading_from(str(source), key="model_path"):
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=torch.float32, trust_remote_code=trust_remote_code
        )
        tokenizer = load_tokenizer(str(source), trust_remote_code=trust_remote_code)
    return model.eval(), tokenizer


def _hydra_main() -> None:
    import hydra

    from trainer.export_config import register_export_configs
    from trainer.utils import register_package_resolver

    register_export_configs()  # its own schemas only: exporting imports nothing of training's
    register_package_resolver()

    @hydra.main(version_base=None, config_path=CONF_DIR, config_name="export")
    def hydra_main(cfg: DictConfig) -> None:
        export(cfg)

    hydra_main()


# ---- the positional form (format=hf of one checkpoint, as before) -----------------------------------------


def export_checkpoint(
    checkpoint: Path, output: Path, *, run_dir: Path | None = None, trust_remote_code: bool = False
) -> None:
    """The HF export of one checkpoint into `output`; for an adapter checkpoint (peft=lora|dora) the merged
    model, with the adapters in the peft format in `output/adapter/`."""
    if not export_adapters(checkpoint, output, trust_remote_code=trust_remote_code):
        checkpoint_model.export_checkpoint(
            checkpoint, output, run_dir=run_dir, trust_remote_code=trust_remote_code
        )


def is_adapter_checkpoint(path: Path) -> bool:
    state = Path(path) / STATE_FILE
    return state.is_file() and "peft" in json.loads(state.read_text())


def export_adapters(checkpoint: Path, output: Path, *, trust_remote_code: bool = False) -> bool:
    """A checkpoint of a peft=lora|dora run (only adapters, a reference to the base): `output` gets the merged
    model, `output/adapter/` the adapters in the peft format; False for any other checkpoint. The peft code
    is imported only for such a checkpoint."""
    if not is_adapter_checkpoint(checkpoint):
        return False
    from trainer.peft.export import export_adapter_checkpoint

    problems = checkpoint_problems(checkpoint)
    if problems:
        raise CheckpointError(f"{checkpoint} is damaged: {'; '.join(problems)}")
    config, tokenizer, trust = describe_checkpoint(checkpoint, trust_remote_code=trust_remote_code)
    export_adapter_checkpoint(checkpoint, output, config=config, tokenizer=tokenizer, trust_remote_code=trust)
    return True


def check_checkpoint(checkpoint: Path) -> None:
    """A checkpoint step directory, or an error naming what `checkpoint` is instead and what to give."""
    if not checkpoint.exists():
        raise InputNotFoundError(
            f"{checkpoint}: no such file or directory; give a checkpoint, RUN_DIR/checkpoints/step_XXXXXXXX"
        )
    if (checkpoint / STATE_FILE).is_file():
        return
    latest = find_checkpoint(checkpoint) if checkpoint.is_dir() else None
    if latest is not None:
        raise ConfigError(
            f"{checkpoint} is a run directory (or its checkpoints/), not a checkpoint; give one of its "
            f"checkpoints, e.g. the latest: python -m trainer.export {latest} OUTPUT_DIR"
        )
    if (checkpoint / "config.json").is_file():
        raise ConfigError(
            f"{checkpoint} is already an HF model directory (config.json, no {STATE_FILE}): there is nothing "
            "to export; load it as it is"
        )
    raise InputNotFoundError(
        f"{checkpoint}: not a checkpoint (no {STATE_FILE}); give RUN_DIR/checkpoints/step_XXXXXXXX"
    )


def _positional_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Other formats and inputs: python -m trainer.export model_path=DIR format=FORMAT output_dir=OUT "
        "(conf/export.yaml)",
    )
    parser.add_argument("checkpoint", type=Path, help="a checkpoints/step_XXXXXXXX directory")
    parser.add_argument("output", type=Path, help="directory to write the HF export into")
    parser.add_argument(
        "--run-dir",
        type=Path,
        default=None,
        help="the run directory, read only for a checkpoint without config.json (default: the checkpoint's)",
    )
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run the model's own code from the hub (a checkpoint of a model.trust_remote_code=true run)",
    )
    args = parser.parse_args(argv)
    check_checkpoint(args.checkpoint)
    export_checkpoint(
        args.checkpoint, args.output, run_dir=args.run_dir, trust_remote_code=args.trust_remote_code
    )
    print(f"exported {args.checkpoint} to {args.output}")


_HYDRA_FLAGS = ("--cfg", "-c", "--info", "--hydra-help", "--resolve", "--package", "-p")


def is_hydra_form(argv: list[str]) -> bool:
    """`key=value` overrides (or Hydra's own flags) rather than the positional CHECKPOINT OUTPUT."""
    return any(a in _HYDRA_FLAGS or ("=" in a and not a.startswith("-")) for a in argv)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not is_hydra_form(argv):
        _positional_main(argv)
        return
    saved = sys.argv
    sys.argv = [saved[0], *argv]  # Hydra reads its overrides from sys.argv
    try:
        _hydra_main()
    finally:
        sys.argv = saved


if __name__ == "__main__":
    run(main)
