"""Any model path a command takes, resolved and loaded: a checkpoint (or a run directory's newest), an hf/
export, a trainer.quantize output, a compressed-tensors export, a .gguf file, or an adapter/ directory (the peft
format) merged into its base. `trainer.generate` and `trainer.evaluate` load through here, so that both take the
same paths and neither imports the other.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from trainer.checkpoint import STATE_FILE, find_checkpoint
from trainer.errors import ConfigError, CorruptFileError, InputNotFoundError
from trainer.quant.serialization import (
    compressed_tensors_scheme,
    gguf_in,
    is_quantized_dir,
    load_any,
    load_tokenizer_from,
    load_tokenizer_of,
    read_manifest,
)
from trainer.utils import require

ADAPTER_CONFIG = "adapter_config.json"  # the peft format's: an adapter/ directory holds it
MODEL_KINDS = (
    "a checkpoints/step_XXXXXXXX directory or its run directory, a run's hf/ or adapter/ directory, a "
    "trainer.quantize output, a compressed-tensors export, or a .gguf file (or a directory holding one)"
)


def is_adapter_dir(path: Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def model_source(path: Path, *, key: str = "model") -> Path:
    """The model a path (the option `key`) names: itself, or for a run directory (or its `latest` pointer) the
    newest complete checkpoint, else the run's hf/ export."""
    if is_adapter_dir(path) or gguf_in(path) is not None or (path / "config.json").is_file():
        return path
    found = find_checkpoint(path)
    if found is not None:
        return found
    if (path / "hf" / "config.json").is_file():
        return path / "hf"
    raise InputNotFoundError(f"{key}={path}: not a model; give {MODEL_KINDS}")


@contextmanager
def _adapter_checkpoint_exported(checkpoint: Path) -> Iterator[Path]:
    """A checkpoint of a peft=lora|dora run as the merged model trainer.export writes, for the duration."""
    from trainer.checkpoint_model import describe_checkpoint
    from trainer.peft.export import export_adapter_checkpoint

    description = describe_checkpoint(checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        export_adapter_checkpoint(
            checkpoint, Path(tmp) / "hf", config=description.config, tokenizer=description.tokenizer
        )
        yield Path(tmp) / "hf"


def _holds_adapters(path: Path) -> bool:
    state = path / STATE_FILE
    return state.is_file() and "peft" in json.loads(state.read_text())


def load_model(path: Path, *, device: torch.device, dtype: torch.dtype) -> Any:
    """The model of any path but an adapter/ directory, in eval mode on `device`: float models in `dtype`,
    quantized ones as stored (int8_smooth on the CPU: its kernels are fbgemm's)."""
    path = model_source(path)
    if _holds_adapters(path):
        with _adapter_checkpoint_exported(path) as merged:
            return load_model(merged, device=device, dtype=dtype)
    quantized = is_quantized_dir(path)
    if quantized and read_manifest(path)["scheme"] == "int8_smooth":
        device = torch.device("cpu")
    model, _, _ = load_any(path, device=device, with_tokenizer=False)  # the caller has the tokenizer
    if not quantized and not compressed_tensors_scheme(path):
        model.to(dtype)
    return model.eval()


def base_of(adapter: Path, base: str | None) -> Path:
    """The model an adapter/ directory adapts: `base`, or the one its adapter_config.json names."""
    file = adapter / ADAPTER_CONFIG
    try:
        adapter_config = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptFileError(
            f"{file}: not JSON ({err}); export the adapter again (trainer.export)"
        ) from err
    named = adapter_config.get("base_model_name_or_path") if isinstance(adapter_config, dict) else None
    key = "base" if base is not None else f"base_model_name_or_path in {file}"
    base = base if base is not None else named
    if not base:
        raise ConfigError(
            f"model={adapter}: {file} names no base model (its base was built from a config, model.source=config); "
            "give the one it adapts with base=PATH, or generate with the run's merged hf/ instead"
        )
    if not Path(base).exists():
        raise InputNotFoundError(
            f"{key}: {base}: no such file or directory; give the model the adapter was trained on with "
            "base=PATH (its hf/ export, a checkpoint or a .gguf file)"
        )
    path = model_source(Path(base), key="base")
    if is_quantized_dir(path) or compressed_tensors_scheme(path):
        raise ConfigError(
            f"base={base}: a quantized model; the adapter merges into float weights: give the float base it "
            "was trained on"
        )
    return path


def load_adapter(adapter: Path, *, base: str | None, device: torch.device, dtype: torch.dtype) -> Any:
    """An adapter/ directory (the peft format) merged into its base (`base_of`), in eval mode."""
    model = load_model(base_of(adapter, base), device=device, dtype=dtype)
    peft = require("peft", extra="peft")
    return peft.PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().eval()


def tokenizer_of(path: Path, *, base: str | None = None) -> Any:
    """The tokenizer of a model path, without its weights: an adapter/ directory's own, else its base's."""
    if is_adapter_dir(path):
        if (path / "tokenizer_config.json").is_file():
            return load_tokenizer_from(str(path))
        return load_tokenizer_of(base_of(path, base))
    return load_tokenizer_of(model_source(path))
