"""Small shared helpers: optional packages, dtypes and devices."""

from __future__ import annotations

import importlib
from types import ModuleType

import torch


class MissingPackageError(ImportError):
    """An optional package is needed by the config; the message names the extra that installs it."""


def require(module: str, *, extra: str, package: str | None = None) -> ModuleType:
    """Import an optional dependency or fail with the pip command that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingPackageError(
            f"this configuration needs the Python package {package or module!r}, which is not installed; "
            f"install it with: pip install 'trainer[{extra}]'"
        ) from e


def resolve_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(
                "train.device=cuda but no CUDA device is visible; use train.device=cpu or auto"
            )
        return torch.device("cuda", local_rank)
    return torch.device(name)
